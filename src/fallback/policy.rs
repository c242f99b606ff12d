//! Which model serves a request: the [`Policy`] trait, its default ([`Thresholds`]: 0.70 /
//! 0.30), combinators ([`PolicyExt`]), and the walk's rules for error answers.
//!
//! The fallback layer asks its policy about each candidate model of a request, best model
//! first, with the candidate's [`QuotaView`] (what the quota board knows right now) and the
//! request ([`RequestMeta`], headers). The first candidate the policy answers
//! [`Action::Use`] for is sent, and the candidates after it are neither viewed nor asked
//! (a policy is asked only as far as it needs to be; do not count on one call per
//! candidate). When it uses none, the candidate with the most headroom among
//! those it did not [`Action::Exclude`] is sent: a request is never refused by a policy. The
//! same question is asked again, among the models below, when an answer moves the request on
//! (see the [module docs](super#failing-over)).
//!
//! Modelled on `tower_http::follow_redirect::policy`: a policy is a small object-safe trait
//! (store it as `Arc<dyn Policy>`), composed with [`and`](PolicyExt::and),
//! [`or`](PolicyExt::or) and [`never_for`](PolicyExt::never_for), or written as a closure
//! with [`policy_fn`].
//!
//! ```
//! use tower_claude::fallback::{Action, FallbackLayer, PolicyExt, Thresholds, policy_fn};
//!
//! // The default thresholds, but never Haiku, and never a fallback for Opus 4.7 requests
//! // tagged as critical by the caller.
//! let no_haiku = policy_fn(|c| {
//!     if c.model().starts_with("claude-haiku") { Action::Exclude } else { Action::Use }
//! });
//! let critical = policy_fn(|c| {
//!     let tagged = c.headers().get("x-priority").is_some_and(|v| v == "critical");
//!     if tagged && c.position() > 0 { Action::Exclude } else { Action::Use }
//! });
//! let policy = Thresholds::default().and(no_haiku).and(critical);
//! let layer = FallbackLayer::new().policy(policy);
//! # drop(layer);
//! ```

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::anthropic::{ApiErrorKind, ModelCatalog, RequestMeta};

/// The default per-position thresholds: the requested model needs 70 % of its binding bucket
/// left, the next model 30 %, any later model anything.
pub(crate) const DEFAULT_THRESHOLDS: [f64; 2] = [0.70, 0.30];

/// How one candidate model looks on the quota board right now, for one request: the binding
/// remaining fraction, whether the request's cost fits the buckets now, and how long until it
/// does.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::fallback::QuotaView;
///
/// let view = QuotaView::new(0.25, false, Some(Duration::from_secs(3)));
/// assert_eq!(view.fraction(), 0.25);
/// assert!(!view.fits_now());
/// assert_eq!(view.wait(), Some(Duration::from_secs(3)));
/// assert!(QuotaView::unknown().fits_now());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaView {
    /// Binding remaining fraction (1.0 when unknown).
    pub(crate) fraction: f64,
    /// This request's cost fits the candidate's buckets now.
    pub(crate) fits: bool,
    /// Time until the cost fits by refill (`None`: never, or unknown).
    pub(crate) wait: Option<Duration>,
}

impl QuotaView {
    /// A view: the binding remaining `fraction` (`0.0..=1.0`; anything else is clamped, NaN
    /// is 0), whether the request fits now, and the time until it fits (`None`: never, or
    /// unknown).
    pub fn new(fraction: f64, fits_now: bool, wait: Option<Duration>) -> Self {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        Self {
            fraction,
            fits: fits_now,
            wait,
        }
    }

    /// A group the board knows nothing about yet: full, fits now.
    pub fn unknown() -> Self {
        Self::new(1.0, true, Some(Duration::ZERO))
    }

    /// The binding remaining fraction: the lowest of the requests, input-token and
    /// output-token buckets ([`Headroom::fraction`](crate::quota::Headroom::fraction)).
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Whether the request's cost fits the buckets now.
    pub fn fits_now(&self) -> bool {
        self.fits
    }

    /// How long until the cost fits by refill (zero when it fits now; `None`: never, or
    /// unknown).
    pub fn wait(&self) -> Option<Duration> {
        self.wait
    }
}

/// One candidate model for one request, as a [`Policy`] sees it.
///
/// Build one with [`Candidate::new`] to unit-test a policy in isolation.
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
/// use tower_claude::fallback::{Action, Candidate, Policy, QuotaView, Thresholds};
///
/// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":64}"#).unwrap();
/// let sonnet = Candidate::new(&meta, "claude-sonnet-4-6", 1, QuotaView::new(0.5, true, None));
/// assert_eq!(sonnet.requested(), "claude-opus-4-7");
/// assert_eq!(Thresholds::default().decide(&sonnet), Action::Use); // 0.5 >= 0.30
/// ```
#[derive(Clone, Copy)]
pub struct Candidate<'a> {
    request: &'a RequestMeta,
    headers: &'a HeaderMap,
    model: &'a str,
    position: usize,
    quota: QuotaView,
}

static NO_HEADERS: LazyLock<HeaderMap> = LazyLock::new(HeaderMap::new);

impl fmt::Debug for Candidate<'_> {
    /// The headers are left out: they carry the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidate")
            .field("requested", &self.requested())
            .field("model", &self.model)
            .field("position", &self.position)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl<'a> Candidate<'a> {
    /// The candidate `model` at `position` in the request's chain (0: the requested model)
    /// for the request scanned as `request`, with its quota view. No headers: see
    /// [`with_headers`](Self::with_headers).
    pub fn new(
        request: &'a RequestMeta,
        model: &'a str,
        position: usize,
        quota: QuotaView,
    ) -> Self {
        Self {
            request,
            headers: &NO_HEADERS,
            model,
            position,
            quota,
        }
    }

    /// The same candidate, with the request's headers.
    pub fn with_headers(mut self, headers: &'a HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// The model the caller asked for.
    pub fn requested(&self) -> &'a str {
        self.request.model.as_deref().unwrap_or_default()
    }

    /// The request, as scanned once ([`RequestMeta`]): `max_tokens`, `stream`, the input
    /// estimate, ...
    pub fn request(&self) -> &'a RequestMeta {
        self.request
    }

    /// The request's headers (`x-api-key` included: never log them).
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The candidate model.
    pub fn model(&self) -> &'a str {
        self.model
    }

    /// Its position in the request's chain: 0 is the requested model, 1 the next, ...
    pub fn position(&self) -> usize {
        self.position
    }

    /// What the quota board knows about it, for this request.
    pub fn quota(&self) -> QuotaView {
        self.quota
    }
}

/// What a [`Policy`] says about one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send the request to this model (the first candidate, in chain order, a policy uses is
    /// sent).
    Use,
    /// Not while a better candidate is used; still a last resort when the policy uses none
    /// (the one with the most headroom is then sent).
    Skip,
    /// Never this model for this request, not even as a last resort. Before the first send,
    /// the requested model is sent when every candidate is excluded.
    Exclude,
}

/// Chooses the model of a request among its candidates. See the [module docs](self).
///
/// Object-safe: a layer stores it as `Arc<dyn Policy>`. Implement it for your own type, or
/// use [`policy_fn`] for a closure; compose with [`PolicyExt`].
///
/// ```
/// use tower_claude::fallback::{Action, Candidate, FallbackLayer, Policy};
///
/// /// Fall back only for short answers: a long generation stays on the requested model
/// /// unless its quota is really gone.
/// struct ShortAnswersOnly;
///
/// impl Policy for ShortAnswersOnly {
///     fn decide(&self, c: &Candidate<'_>) -> Action {
///         let long = c.request().max_tokens.is_some_and(|t| t > 4096);
///         match (c.position(), long) {
///             (0, _) if c.quota().fits_now() => Action::Use,
///             (0, _) => Action::Skip,
///             (_, true) => Action::Exclude,
///             _ if c.quota().fraction() >= 0.3 => Action::Use,
///             _ => Action::Skip,
///         }
///     }
/// }
///
/// let layer = FallbackLayer::new().policy(ShortAnswersOnly);
/// # drop(layer);
/// ```
pub trait Policy: Send + Sync {
    /// What to do with `candidate`.
    fn decide(&self, candidate: &Candidate<'_>) -> Action;
}

impl<P: Policy + ?Sized> Policy for &P {
    fn decide(&self, candidate: &Candidate<'_>) -> Action {
        (**self).decide(candidate)
    }
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn decide(&self, candidate: &Candidate<'_>) -> Action {
        (**self).decide(candidate)
    }
}

impl<P: Policy + ?Sized> Policy for Arc<P> {
    fn decide(&self, candidate: &Candidate<'_>) -> Action {
        (**self).decide(candidate)
    }
}

/// The default policy: a candidate is used when the request fits it now and its binding
/// remaining fraction is at least the threshold of its position in the chain (0.70 for the
/// requested model, 0.30 for the next, 0 for any later one by default); otherwise skipped.
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
/// use tower_claude::fallback::{Action, Candidate, Policy, QuotaView, Thresholds};
///
/// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":64}"#).unwrap();
/// let opus = Candidate::new(&meta, "claude-opus-4-7", 0, QuotaView::new(0.6, true, None));
/// assert_eq!(Thresholds::default().decide(&opus), Action::Skip); // 0.6 < 0.70
/// assert_eq!(Thresholds::new([0.5]).decide(&opus), Action::Use);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    thresholds: Vec<f64>,
}

impl Thresholds {
    /// Thresholds by position (0: the requested model); positions past the end need 0 (only
    /// that the request fits). Non-finite values count as 0.
    pub fn new(thresholds: impl IntoIterator<Item = f64>) -> Self {
        Self {
            thresholds: thresholds.into_iter().collect(),
        }
    }

    /// The threshold of `position`.
    pub fn at(&self, position: usize) -> f64 {
        threshold(&self.thresholds, position)
    }
}

impl Default for Thresholds {
    /// 0.70, 0.30, then 0.
    fn default() -> Self {
        Self::new(DEFAULT_THRESHOLDS)
    }
}

impl Policy for Thresholds {
    fn decide(&self, c: &Candidate<'_>) -> Action {
        if c.quota.fits && c.quota.fraction >= self.at(c.position) {
            Action::Use
        } else {
            Action::Skip
        }
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

/// A policy from a closure `Fn(&Candidate) -> Action`.
///
/// ```
/// use tower_claude::fallback::{Action, PolicyExt, Thresholds, policy_fn};
///
/// // Never serve a streaming request with a lower model.
/// let policy = Thresholds::default().and(policy_fn(|c| {
///     if c.position() > 0 && c.request().stream { Action::Exclude } else { Action::Use }
/// }));
/// # drop(policy);
/// ```
pub fn policy_fn<F>(f: F) -> PolicyFn<F>
where
    F: Fn(&Candidate<'_>) -> Action + Send + Sync,
{
    PolicyFn { f }
}

impl<F> Policy for PolicyFn<F>
where
    F: Fn(&Candidate<'_>) -> Action + Send + Sync,
{
    fn decide(&self, candidate: &Candidate<'_>) -> Action {
        (self.f)(candidate)
    }
}

/// Both policies must use a candidate; either one excludes it. See [`PolicyExt::and`].
#[derive(Debug, Clone, Copy)]
pub struct And<A, B> {
    a: A,
    b: B,
}

impl<A: Policy, B: Policy> Policy for And<A, B> {
    fn decide(&self, c: &Candidate<'_>) -> Action {
        match (self.a.decide(c), self.b.decide(c)) {
            (Action::Exclude, _) | (_, Action::Exclude) => Action::Exclude,
            (Action::Use, Action::Use) => Action::Use,
            _ => Action::Skip,
        }
    }
}

/// Either policy may use a candidate; both must exclude it. See [`PolicyExt::or`].
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A: Policy, B: Policy> Policy for Or<A, B> {
    fn decide(&self, c: &Candidate<'_>) -> Action {
        match (self.a.decide(c), self.b.decide(c)) {
            (Action::Use, _) | (_, Action::Use) => Action::Use,
            (Action::Exclude, Action::Exclude) => Action::Exclude,
            _ => Action::Skip,
        }
    }
}

/// Requests for the listed models are never moved to another model. See
/// [`PolicyExt::never_for`].
#[derive(Debug, Clone)]
pub struct NeverFor<P> {
    inner: P,
    models: Vec<String>,
}

impl<P: Policy> Policy for NeverFor<P> {
    fn decide(&self, c: &Candidate<'_>) -> Action {
        if c.position > 0 && self.models.iter().any(|m| m == c.requested()) {
            Action::Exclude
        } else {
            self.inner.decide(c)
        }
    }
}

/// Combinators for every [`Policy`].
pub trait PolicyExt: Policy + Sized {
    /// A policy that uses a candidate only when both `self` and `other` use it, and excludes
    /// it when either excludes it.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::fallback::{Action, Candidate, Policy, PolicyExt, QuotaView, Thresholds, policy_fn};
    ///
    /// let not_haiku = policy_fn(|c| if c.model().contains("haiku") { Action::Exclude } else { Action::Use });
    /// let policy = Thresholds::default().and(not_haiku);
    /// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
    /// let haiku = Candidate::new(&meta, "claude-haiku-4-5", 2, QuotaView::unknown());
    /// assert_eq!(policy.decide(&haiku), Action::Exclude);
    /// ```
    fn and<B: Policy>(self, other: B) -> And<Self, B> {
        And { a: self, b: other }
    }

    /// A policy that uses a candidate when `self` or `other` uses it, and excludes it only
    /// when both exclude it.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::fallback::{Action, Candidate, Policy, PolicyExt, QuotaView, Thresholds, policy_fn};
    ///
    /// // Also stay on the requested model while it fits at all, for batch traffic.
    /// let batch = policy_fn(|c| {
    ///     let batch = c.headers().get("x-batch").is_some();
    ///     if batch && c.position() == 0 && c.quota().fits_now() { Action::Use } else { Action::Skip }
    /// });
    /// let policy = Thresholds::default().or(batch);
    /// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("x-batch", "1".parse().unwrap());
    /// let low = Candidate::new(&meta, "claude-opus-4-7", 0, QuotaView::new(0.1, true, None));
    /// assert_eq!(policy.decide(&low), Action::Skip);
    /// assert_eq!(policy.decide(&low.with_headers(&headers)), Action::Use);
    /// ```
    fn or<B: Policy>(self, other: B) -> Or<Self, B> {
        Or { a: self, b: other }
    }

    /// A policy that never moves a request for one of `models` to another model (those
    /// requests behave as with [`NoFallback`](super::NoFallback)); other requests are decided
    /// by `self`.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::fallback::{Action, Candidate, Policy, PolicyExt, QuotaView, Thresholds};
    ///
    /// let policy = Thresholds::default().never_for(["claude-opus-4-7"]);
    /// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
    /// let sonnet = Candidate::new(&meta, "claude-sonnet-4-6", 1, QuotaView::unknown());
    /// assert_eq!(policy.decide(&sonnet), Action::Exclude);
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

/// The threshold of the candidate at `position` (0 = the requested model): the configured
/// value, or 0 past the end of the list. Non-finite values count as 0.
pub(crate) fn threshold(thresholds: &[f64], position: usize) -> f64 {
    thresholds
        .get(position)
        .copied()
        .filter(|t| t.is_finite())
        .unwrap_or(0.0)
}

/// Chooses among `candidates` (`(view, action)` in chain order): the first the policy uses;
/// else the one with the most headroom among those it did not exclude: cost fits now, then
/// shortest wait until it fits, then highest fraction, then earliest in the chain. `None`
/// when every candidate is excluded (or there is none).
pub(crate) fn select(candidates: &[(QuotaView, Action)]) -> Option<usize> {
    if let Some(i) = candidates.iter().position(|(_, a)| *a == Action::Use) {
        return Some(i);
    }
    let mut best: Option<usize> = None;
    for (i, (v, a)) in candidates.iter().enumerate() {
        if *a == Action::Exclude {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => more_headroom(v, &candidates[b].0),
        };
        if better {
            best = Some(i);
        }
    }
    best
}

/// Whether `a` has strictly more headroom than `b` (ties keep the earlier candidate).
pub(crate) fn more_headroom(a: &QuotaView, b: &QuotaView) -> bool {
    if a.fits != b.fits {
        return a.fits;
    }
    match (a.wait, b.wait) {
        (Some(x), Some(y)) if x != y => return x < y,
        (Some(_), None) => return true,
        (None, Some(_)) => return false,
        _ => {}
    }
    a.fraction > b.fraction
}

/// The models a request for `requested` may be served by: `catalog.chain_from(requested)`,
/// truncated at `floor`, each model once (a chain that names a model twice keeps its first
/// place).
///
/// The floor is found by exact id among the candidates; otherwise candidates of a family lower
/// than the floor's family are dropped. A floor that can be placed neither way (unknown id of
/// unknown family) leaves only the requested model. The requested model itself is never
/// dropped.
pub(crate) fn candidates(
    catalog: &ModelCatalog,
    requested: &str,
    floor: Option<&str>,
) -> Vec<String> {
    let mut chain = catalog.chain_from(requested);
    // The first of duplicates stays. A chain has a handful of models: comparing with the
    // earlier ones costs less than a hash set and a clone of every name (this runs for every
    // request, and once more per cache miss).
    let mut i = 0;
    while i < chain.len() {
        if chain[..i].contains(&chain[i]) {
            chain.remove(i);
        } else {
            i += 1;
        }
    }
    let Some(floor) = floor else {
        return chain;
    };
    if let Some(at) = chain.iter().position(|m| m == floor) {
        chain.truncate(at + 1);
        return chain;
    }
    match catalog.family(floor) {
        Some(lowest) => {
            let mut out = Vec::with_capacity(chain.len());
            for (i, model) in chain.into_iter().enumerate() {
                let allowed = i == 0 || catalog.family(&model).is_some_and(|f| f <= lowest);
                if !allowed {
                    break;
                }
                out.push(model);
            }
            out
        }
        None => {
            chain.truncate(1);
            chain
        }
    }
}

/// What an error answer means for the walk down the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Return the answer to the caller.
    Return,
    /// Send the same model again (a 529 under the per-model count).
    Resend,
    /// Move on to a lower model.
    FailOver,
}

/// The rules the walk applies to an error answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) max_wait_before_failover: Duration,
    pub(crate) max_overloaded: u32,
}

/// Classifies an answer with `status` and error `kind` (from its envelope).
///
/// * spend cap (429 `enforced_spend_limit_reached`): fail over;
/// * 429: fail over when the server's wait is unknown or longer than the bound, or when a
///   retry layer below already gave up on it (`retried`); else return it;
/// * 529: fail over when `overloaded` (529s from this model so far, this one included) reached
///   the bound or a retry layer below gave up on it; else send the same model again;
/// * anything else: return it.
pub(crate) fn classify(
    rules: &Rules,
    status: StatusCode,
    kind: Option<ApiErrorKind>,
    server_wait: Option<Duration>,
    overloaded: u32,
    retried: bool,
) -> Verdict {
    if kind == Some(ApiErrorKind::SpendLimit) {
        return Verdict::FailOver;
    }
    match status.as_u16() {
        429 => {
            let long = match server_wait {
                None => true,
                Some(w) => w > rules.max_wait_before_failover,
            };
            if long || retried {
                Verdict::FailOver
            } else {
                Verdict::Return
            }
        }
        529 => {
            if retried || overloaded >= rules.max_overloaded {
                Verdict::FailOver
            } else {
                Verdict::Resend
            }
        }
        _ => Verdict::Return,
    }
}

/// Whether an inner service error (no HTTP answer) moves the request on: the retry layer's
/// [`SpendLimit`](crate::retry::RetryErrorKind::SpendLimit) error, or a spend-cap
/// [`ApiError`](crate::anthropic::ApiError), anywhere in its source chain. Any other error is
/// returned.
pub(crate) fn error_fails_over(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(retry) = e.downcast_ref::<crate::retry::RetryError>() {
            if retry.kind() == crate::retry::RetryErrorKind::SpendLimit {
                return true;
            }
        }
        if let Some(api) = e.downcast_ref::<crate::anthropic::ApiError>() {
            if api.kind() == ApiErrorKind::SpendLimit {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// Whether a response with `status` may lead to a failover or a re-send (and so its error
/// envelope is worth reading).
pub(crate) fn may_move_on(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 529)
}

#[cfg(test)]
mod tests {
    use super::*;

    type View = QuotaView;

    /// `select` with the decisions of the default policy with `thresholds`, candidates given
    /// by their position in the chain.
    fn select_t(candidates: &[(usize, View)], thresholds: &[f64]) -> Option<usize> {
        let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
        let policy = Thresholds::new(thresholds.iter().copied());
        let decided: Vec<(View, Action)> = candidates
            .iter()
            .map(|(pos, v)| (*v, policy.decide(&Candidate::new(&meta, "m", *pos, *v))))
            .collect();
        select(&decided)
    }

    fn v(fraction: f64, fits: bool, wait: Option<u64>) -> View {
        View {
            fraction,
            fits,
            wait: wait.map(Duration::from_secs),
        }
    }

    const T: &[f64] = &DEFAULT_THRESHOLDS;

    #[test]
    fn thresholds_per_position() {
        assert_eq!(threshold(T, 0), 0.70);
        assert_eq!(threshold(T, 1), 0.30);
        assert_eq!(threshold(T, 2), 0.0);
        assert_eq!(threshold(&[f64::NAN], 0), 0.0);
    }

    #[test]
    fn first_qualifying_candidate_wins() {
        let full = v(1.0, true, Some(0));
        assert_eq!(select_t(&[(0, full), (1, full), (2, full)], T), Some(0));
        let opus = v(0.69, true, Some(0));
        assert_eq!(select_t(&[(0, opus), (1, full), (2, full)], T), Some(1));
        assert_eq!(
            select_t(&[(0, v(0.70, true, Some(0))), (1, full)], T),
            Some(0)
        );
        let sonnet = v(0.29, true, Some(0));
        assert_eq!(select_t(&[(0, opus), (1, sonnet), (2, full)], T), Some(2));
        // A candidate whose cost does not fit is skipped even with a high fraction.
        let big = v(0.95, false, Some(3));
        assert_eq!(select_t(&[(0, big), (1, full)], T), Some(1));
    }

    #[test]
    fn positions_not_indices_decide_thresholds() {
        // After a failover the remaining candidates keep their positions in the chain.
        assert_eq!(
            select_t(
                &[(1, v(0.31, true, Some(0))), (2, v(1.0, true, Some(0)))],
                T
            ),
            Some(0)
        );
        assert_eq!(
            select_t(
                &[(1, v(0.29, true, Some(0))), (2, v(0.05, true, Some(0)))],
                T
            ),
            Some(1)
        );
    }

    #[test]
    fn none_qualifies_most_headroom_wins() {
        // Everything below its threshold and fitting: highest fraction.
        let c = [
            (0, v(0.5, true, Some(0))),
            (1, v(0.2, true, Some(0))),
            (2, v(0.1, false, Some(2))),
        ];
        assert_eq!(select_t(&c, T), Some(0));
        // Nothing fits: the shortest wait, then the fraction.
        let c = [
            (0, v(0.9, false, Some(10))),
            (1, v(0.1, false, Some(2))),
            (2, v(0.5, false, None)),
        ];
        assert_eq!(select_t(&c, T), Some(1));
        let c = [(0, v(0.2, false, Some(2))), (1, v(0.3, false, Some(2)))];
        assert_eq!(select_t(&c, T), Some(1));
        let c = [(0, v(0.2, false, None)), (1, v(0.2, false, None))];
        assert_eq!(select_t(&c, T), Some(0));
        assert_eq!(select_t(&[], T), None);
    }

    #[test]
    fn excluded_candidates_are_never_a_last_resort() {
        let low = v(0.1, true, Some(0));
        let full = v(1.0, true, Some(0));
        // Nothing used: the most headroom among the skipped ones, the excluded one ignored.
        let c = [
            (low, Action::Skip),
            (full, Action::Exclude),
            (v(0.2, true, Some(0)), Action::Skip),
        ];
        assert_eq!(select(&c), Some(2));
        assert_eq!(select(&[(full, Action::Exclude)]), None);
        assert_eq!(select(&[(low, Action::Skip), (full, Action::Use)]), Some(1));
    }

    #[test]
    fn combinators() {
        let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
        let fixed = |a: Action| policy_fn(move |_| a);
        let c = Candidate::new(&meta, "claude-sonnet-4-6", 1, QuotaView::unknown());
        let all = [Action::Use, Action::Skip, Action::Exclude];
        for a in all {
            for b in all {
                let and = fixed(a).and(fixed(b)).decide(&c);
                let or = fixed(a).or(fixed(b)).decide(&c);
                let expected_and = if a == Action::Exclude || b == Action::Exclude {
                    Action::Exclude
                } else if a == Action::Use && b == Action::Use {
                    Action::Use
                } else {
                    Action::Skip
                };
                let expected_or = if a == Action::Use || b == Action::Use {
                    Action::Use
                } else if a == Action::Exclude && b == Action::Exclude {
                    Action::Exclude
                } else {
                    Action::Skip
                };
                assert_eq!(and, expected_and, "{a:?} and {b:?}");
                assert_eq!(or, expected_or, "{a:?} or {b:?}");
            }
        }
        // never_for: only lower candidates of the listed requests are excluded.
        let p = fixed(Action::Use).never_for(["claude-opus-4-7"]);
        assert_eq!(p.decide(&c), Action::Exclude);
        let same = Candidate::new(&meta, "claude-opus-4-7", 0, QuotaView::unknown());
        assert_eq!(p.decide(&same), Action::Use);
        let other = RequestMeta::scan(br#"{"model":"claude-sonnet-4-6","max_tokens":8}"#).unwrap();
        let haiku = Candidate::new(&other, "claude-haiku-4-5", 1, QuotaView::unknown());
        assert_eq!(p.decide(&haiku), Action::Use);
        // Debug never shows the headers (the API key).
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "sk-ant-secret".parse().unwrap());
        assert!(!format!("{:?}", same.with_headers(&headers)).contains("sk-ant-secret"));
        // Object safety: boxed and shared policies are policies.
        let boxed: Box<dyn Policy> = Box::new(Thresholds::default());
        let shared: Arc<dyn Policy> = Arc::new(boxed);
        assert_eq!(shared.decide(&same), Action::Use);
    }

    #[test]
    fn floor_truncates_the_chain() {
        let c = ModelCatalog::default();
        let all = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"];
        assert_eq!(candidates(&c, "claude-opus-4-7", None), all);
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-sonnet-4-6")),
            all[..2]
        );
        // By family when the floor is not in the chain.
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-sonnet-4-5")),
            all[..2]
        );
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("claude-opus-4-1")),
            all[..1]
        );
        // The requested model is never dropped, never upgraded.
        assert_eq!(
            candidates(&c, "claude-haiku-4-5", Some("claude-opus-4-7")),
            ["claude-haiku-4-5"]
        );
        assert_eq!(
            candidates(&c, "claude-sonnet-4-6", Some("claude-haiku-4-5")),
            all[1..]
        );
        // Each model once.
        let twice = c.clone().with_chain([
            "claude-opus-4-7",
            "claude-sonnet-4-6",
            "claude-opus-4-7",
            "claude-haiku-4-5",
        ]);
        assert_eq!(candidates(&twice, "claude-opus-4-7", None), all);
        // An unplaceable floor allows no fallback.
        assert_eq!(
            candidates(&c, "claude-opus-4-7", Some("gpt-5")),
            ["claude-opus-4-7"]
        );
    }

    #[test]
    fn classification() {
        let r = Rules {
            max_wait_before_failover: Duration::from_secs(10),
            max_overloaded: 2,
        };
        let s429 = StatusCode::TOO_MANY_REQUESTS;
        let s529 = StatusCode::from_u16(529).unwrap();
        let rl = Some(ApiErrorKind::RateLimit);
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(classify(&r, s429, rl, secs(10), 0, false), Verdict::Return);
        assert_eq!(
            classify(&r, s429, rl, secs(11), 0, false),
            Verdict::FailOver
        );
        assert_eq!(classify(&r, s429, rl, None, 0, false), Verdict::FailOver);
        assert_eq!(classify(&r, s429, rl, secs(1), 0, true), Verdict::FailOver);
        let cap = Some(ApiErrorKind::SpendLimit);
        assert_eq!(
            classify(&r, s429, cap, secs(1), 0, false),
            Verdict::FailOver
        );
        let ov = Some(ApiErrorKind::Overloaded);
        assert_eq!(classify(&r, s529, ov, None, 1, false), Verdict::Resend);
        assert_eq!(classify(&r, s529, ov, None, 2, false), Verdict::FailOver);
        assert_eq!(classify(&r, s529, ov, None, 1, true), Verdict::FailOver);
        let api = Some(ApiErrorKind::Api);
        assert_eq!(
            classify(&r, StatusCode::INTERNAL_SERVER_ERROR, api, None, 0, false),
            Verdict::Return
        );
        assert!(may_move_on(s429) && may_move_on(s529));

        #[derive(Debug)]
        struct Wrapper(crate::anthropic::ApiError);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let cap = crate::anthropic::ApiError::new(ApiErrorKind::SpendLimit, "cap");
        assert!(error_fails_over(&Wrapper(cap)));
        let overloaded = crate::anthropic::ApiError::new(ApiErrorKind::Overloaded, "busy");
        assert!(!error_fails_over(&Wrapper(overloaded)));
        let io = std::io::Error::other("reset");
        assert!(!error_fails_over(&io));
        assert!(!may_move_on(StatusCode::OK) && !may_move_on(StatusCode::BAD_REQUEST));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn view() -> impl Strategy<Value = View> {
            (0.0f64..=1.0, any::<bool>(), proptest::option::of(0u64..120)).prop_map(
                |(fraction, fits, wait)| View {
                    fraction,
                    fits,
                    wait: if fits {
                        Some(Duration::ZERO)
                    } else {
                        wait.map(|w| Duration::from_secs(w + 1))
                    },
                },
            )
        }

        proptest! {
            #[test]
            fn select_picks_the_first_qualifier_or_the_most_headroom(
                views in proptest::collection::vec(view(), 0..6),
                thresholds in proptest::collection::vec(0.0f64..=1.0, 0..4),
            ) {
                let candidates: Vec<(usize, View)> = views.iter().copied().enumerate().collect();
                let chosen = select_t(&candidates, &thresholds);
                prop_assert_eq!(chosen.is_some(), !views.is_empty());
                let Some(i) = chosen else { return Ok(()) };
                let qualifies = |j: usize| {
                    views[j].fits && views[j].fraction >= threshold(&thresholds, j)
                };
                match (0..views.len()).find(|&j| qualifies(j)) {
                    Some(first) => prop_assert_eq!(i, first),
                    None => {
                        // Nothing has strictly more headroom than the choice.
                        for (j, v) in views.iter().enumerate() {
                            prop_assert!(!more_headroom(v, &views[i]), "{} beats {}", j, i);
                        }
                        // A candidate that fits now is preferred to one that does not.
                        if views.iter().any(|v| v.fits) {
                            prop_assert!(views[i].fits);
                        }
                    }
                }
            }

            #[test]
            fn candidates_start_with_the_request_and_never_upgrade(
                requested in prop::sample::select(vec![
                    "claude-opus-4-7", "claude-opus-4-1", "claude-sonnet-4-6",
                    "claude-3-5-sonnet-latest", "claude-haiku-4-5", "gpt-5",
                ]),
                floor in proptest::option::of(prop::sample::select(vec![
                    "claude-opus-4-7", "claude-sonnet-4-5", "claude-sonnet-4-6",
                    "claude-haiku-4-5", "unknown-model",
                ])),
            ) {
                let catalog = ModelCatalog::default();
                let out = candidates(&catalog, requested, floor);
                prop_assert_eq!(out[0].as_str(), requested);
                let full = catalog.chain_from(requested);
                prop_assert!(out.iter().all(|m| full.contains(m)));
                let mut seen = std::collections::HashSet::new();
                prop_assert!(out.iter().all(|m| seen.insert(m)));
                let families: Vec<_> = out.iter().filter_map(|m| catalog.family(m)).collect();
                prop_assert!(families.windows(2).all(|w| w[0] <= w[1]));
                if let (Some(floor), Some(last)) = (floor.and_then(|f| catalog.family(f)), out.last()) {
                    if out.len() > 1 {
                        prop_assert!(catalog.family(last).is_some_and(|f| f <= floor));
                    }
                }
            }
        }
    }
}
