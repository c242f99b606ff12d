//! [`RetryLayer`]: builds [`Retry`] services.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tower_layer::Layer;

use super::backoff::{BackoffConfig, Jitter};
use super::pacing::Pacer;
use super::policy::{Action, Policy, PolicyExt, SharedPolicy, policy_fn};
use super::{Retry, RetryBudget};
use crate::BoxError;
use crate::anthropic::ModelCatalog;

/// The largest accepted `max_delay`.
pub(crate) const MAX_DELAY_LIMIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest error body the layer reads to classify a response (error envelopes are small).
pub(crate) const DEFAULT_MAX_ERROR_BODY: usize = 64 * 1024;
/// The most stream bytes held back while waiting for the first content event.
pub(crate) const DEFAULT_MAX_HOLD_BACK: usize = 256 * 1024;
/// The most of a 2xx JSON body read before it is returned, when the request has a deadline
/// (a larger one is returned as it is, and cut at the deadline).
pub(crate) const DEFAULT_MAX_JSON_READ: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) backoff: BackoffConfig,
    pub(crate) hold_back_stream: bool,
    pub(crate) pacing: bool,
    pub(crate) catalog: ModelCatalog,
    pub(crate) policy: SharedPolicy,
    pub(crate) max_error_body: usize,
    pub(crate) max_hold_back: usize,
    pub(crate) max_json_read: usize,
}

/// State shared by a service the layer built and its clones (the pacer, the jitter
/// generator and the configuration are the layer's, shared by every service it builds).
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) pacer: Arc<Pacer>,
    pub(crate) rng: Arc<JitterSeed>,
    /// The service's spare (see [`Spare`](super::Spare)): a `Mutex<S>` of the service's
    /// inner type, taken at its first request. Kept here, where every response future
    /// already holds a reference, rather than behind a reference count of its own that
    /// each request would clone and drop.
    spare: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Shared {
    pub(crate) fn new(config: Config, pacer: Arc<Pacer>, rng: Arc<JitterSeed>) -> Self {
        Self {
            config,
            pacer,
            rng,
            spare: OnceLock::new(),
        }
    }

    /// Takes the spare from `inner` when there is none yet (the first request).
    pub(crate) fn keep_spare<S: Clone + Send + 'static>(&self, inner: &S) {
        self.spare
            .get_or_init(|| Box::new(Mutex::new(inner.clone())));
    }

    /// A service for an attempt after the first: a clone of the spare (`None` before any
    /// [`keep_spare`](Self::keep_spare), which the service makes before any response future
    /// exists; a `Shared` serves one service type, its builder's).
    pub(crate) fn spare_service<S: Clone + Send + 'static>(&self) -> Option<S> {
        let spare = self.spare.get()?.downcast_ref::<Mutex<S>>()?;
        Some(spare.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// A random generator for one request, seeded from the layer's generator (so a seeded
    /// layer is deterministic when requests start in a deterministic order).
    pub(crate) fn fork_rng(&self) -> fastrand::Rng {
        self.rng.fork()
    }
}

/// The layer's jitter generator: the state of a [`fastrand::Rng`] in an atomic, shared by
/// every service the layer builds. Each request forks its own generator from it
/// ([`fork`](Self::fork)): one atomic add, where a `Mutex<fastrand::Rng>` took a lock and
/// released it (two locked instructions and the mutex's code, every request).
pub(crate) struct JitterSeed(AtomicU64);

impl JitterSeed {
    /// A generator whose state is `seed` (as [`fastrand::Rng::with_seed`]).
    pub(crate) fn with_seed(seed: u64) -> Self {
        Self(AtomicU64::new(seed))
    }

    /// A randomly seeded generator (as [`fastrand::Rng::new`]).
    pub(crate) fn random() -> Self {
        Self::with_seed(fastrand::Rng::new().get_seed())
    }

    /// A generator seeded with the next `u64` of the layer's generator: the value
    /// `fastrand::Rng::u64(..)` gives, and the state it leaves, as under a lock. `fastrand`'s
    /// generator (wyrand) advances its state by adding a constant and mixes the new state
    /// into its output: the add is done here, atomically, and the mix by a generator made
    /// from the state before it, so concurrent forks each get the value of their place in
    /// the sequence.
    pub(crate) fn fork(&self) -> fastrand::Rng {
        // The increment, read from `fastrand` itself: the state a generator leaves after one
        // `u64`, less the state it started from.
        let step = {
            let mut probe = fastrand::Rng::with_seed(0);
            probe.u64(..);
            probe.get_seed()
        };
        let before = self.0.fetch_add(step, Ordering::Relaxed);
        fastrand::Rng::with_seed(fastrand::Rng::with_seed(before).u64(..))
    }
}

/// Retries Messages API calls that failed for a transient reason, with server-directed delays,
/// jittered backoff, a per-request deadline and an optional shared budget.
///
/// See the [module docs](super) for what is retried and what is returned. Clones of the
/// layer and every service it builds share one state: the 429 penalties and pacing schedules
/// per (API key, rate-limit group), the jitter generator and the budget. Build one layer per
/// upstream and clone it.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::retry::{Jitter, RetryBudget, RetryLayer};
///
/// let layer = RetryLayer::new()
///     .max_attempts(6)
///     .max_delay(Duration::from_secs(60))
///     .deadline(Duration::from_secs(300))
///     .base_delay(Duration::from_millis(250))
///     .jitter(Jitter::Decorrelated)
///     .budget(RetryBudget::default())
///     .seed(42);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryLayer {
    config: Config,
    pacer: Arc<Pacer>,
    rng: Arc<JitterSeed>,
}

impl RetryLayer {
    /// A layer with the defaults: 8 attempts, waits capped at 90 s, no deadline, no budget,
    /// 500 ms backoff base doubling up to 30 s with decorrelated jitter, up to 1 s spread on
    /// server delays, pacing after 429s, streams held back until their first content event.
    pub fn new() -> Self {
        Self {
            config: Config {
                max_attempts: 8,
                deadline: None,
                budget: None,
                backoff: BackoffConfig::default(),
                hold_back_stream: true,
                pacing: true,
                catalog: ModelCatalog::default(),
                policy: SharedPolicy::default(),
                max_error_body: DEFAULT_MAX_ERROR_BODY,
                max_hold_back: DEFAULT_MAX_HOLD_BACK,
                max_json_read: DEFAULT_MAX_JSON_READ,
            },
            pacer: Arc::new(Pacer::default()),
            rng: Arc::new(JitterSeed::random()),
        }
    }

    /// Total attempts per request, the first one included (default 8; at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// The cap on any single wait (default 90 s: long enough to wait for a one-minute quota
    /// reset instead of giving up). A longer server delay is shortened to this. Values above
    /// one day are taken as one day.
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.config.backoff.max_delay = max.min(MAX_DELAY_LIMIT);
        self
    }

    /// The default deadline of a request, measured from when it reaches the layer. A
    /// [`Deadline`](super::Deadline) request extension overrides it. No wait ever crosses the
    /// deadline: when the next one would, the layer returns the last outcome at once. A
    /// deadline too far to represent means none.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = Some(deadline);
        self
    }

    /// A shared [`RetryBudget`]; without one (the default) only `max_attempts` and the
    /// deadline bound retries.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// The base of the exponential backoff used when the server gives no delay
    /// (default 500 ms, as the official SDKs).
    pub fn base_delay(mut self, base: Duration) -> Self {
        self.config.backoff.base = base;
        self
    }

    /// The cap of the exponential backoff (default 30 s). Server delays are capped by
    /// [`max_delay`](Self::max_delay) only.
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.config.backoff.max_backoff = max;
        self
    }

    /// How the backoff is randomised (default [`Jitter::Decorrelated`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.config.backoff.jitter = jitter;
        self
    }

    /// The largest positive spread added to a server-given delay (default 1 s), so that
    /// callers told the same `retry-after` do not all come back at the same instant.
    /// `Duration::ZERO` waits exactly what the server said.
    pub fn spread(mut self, spread: Duration) -> Self {
        self.config.backoff.spread = spread;
        self
    }

    /// Seeds the jitter (for reproducible tests). Unseeded layers use a random seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.rng = Arc::new(JitterSeed::with_seed(seed));
        self
    }

    /// Whether a streaming response is held back until its first content event so that an
    /// `event: error` arriving before any content can still be retried (default true).
    pub fn hold_back_stream(mut self, hold: bool) -> Self {
        self.config.hold_back_stream = hold;
        self
    }

    /// Whether requests on an (API key, rate-limit group) that answered 429 are paced: each
    /// waiting request gets its own admission slot, and new requests join the schedule while
    /// it lasts, instead of all being sent at the instant the `retry-after` ends (default
    /// true). See the [module docs](super#pacing-after-429s).
    pub fn pacing(mut self, pacing: bool) -> Self {
        self.config.pacing = pacing;
        self
    }

    /// The catalogue mapping models to rate-limit groups, which key the shared 429 penalty
    /// and pacing (default [`ModelCatalog::default`]).
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.config.catalog = catalog;
        self
    }

    /// Which failed attempts are retried (default: [`Transient`](super::Transient), the rules
    /// of the [module docs](super#what-is-retried)). The spend cap is never retried and an
    /// answer marked [`RetrySooner`](super::RetrySooner) always is, whatever the policy says;
    /// attempts, deadline and budget bound every policy. Replaces the current policy (and
    /// what [`retry_errors_if`](Self::retry_errors_if) added to it).
    ///
    /// ```
    /// use tower_claude::retry::{PolicyExt, RetryLayer, Transient};
    ///
    /// let layer = RetryLayer::new().policy(Transient.never_for(["claude-opus-4-7"]));
    /// # let _ = layer;
    /// ```
    pub fn policy<P>(mut self, policy: P) -> Self
    where
        P: Policy + 'static,
    {
        self.config.policy = SharedPolicy(Arc::new(policy));
        self
    }

    /// Which inner service errors are retried (default: all of them, since a service below
    /// the layer fails only before any response byte: connection errors and timeouts).
    /// Errors for which `retry` returns false fail at once with
    /// [`RetryErrorKind::Inner`](super::RetryErrorKind::Inner). Shorthand for the current
    /// [`policy`](Self::policy) `.and(` a policy that returns those errors `)`.
    ///
    /// ```
    /// use tower_claude::retry::RetryLayer;
    ///
    /// // Do not retry errors from an inner timeout layer.
    /// let layer = RetryLayer::new()
    ///     .retry_errors_if(|err| !err.is::<tower::timeout::error::Elapsed>());
    /// # let _ = layer;
    /// ```
    pub fn retry_errors_if<F>(mut self, retry: F) -> Self
    where
        F: Fn(&BoxError) -> bool + Send + Sync + 'static,
    {
        let current = self.config.policy.0.clone();
        let errors = policy_fn(move |attempt| match attempt.inner_error() {
            Some(err) if !retry(err) => Action::Return,
            _ => Action::Retry,
        });
        self.config.policy = SharedPolicy(Arc::new(current.and(errors)));
        self
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("max_attempts", &self.config.max_attempts)
            .field("deadline", &self.config.deadline)
            .field("budget", &self.config.budget)
            .field("backoff", &self.config.backoff)
            .field("hold_back_stream", &self.config.hold_back_stream)
            .field("pacing", &self.config.pacing)
            .field("policy", &self.config.policy)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(
            inner,
            Arc::new(Shared::new(
                self.config.clone(),
                self.pacer.clone(),
                self.rng.clone(),
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forks are the generators a `Mutex<fastrand::Rng>` gave (`with_seed(rng.u64(..))`
    /// under the lock), in the same order, from the same seed: a seeded layer's delays are
    /// the ones they were. Fails if the atomic's step or the mix differ from `fastrand`'s.
    #[test]
    fn forks_follow_the_generator_they_replace() {
        for seed in [0, 1, 42, u64::MAX - 3, 0x2d35_8dcc_aa6c_78a5] {
            let atomic = JitterSeed::with_seed(seed);
            let mut locked = fastrand::Rng::with_seed(seed);
            for _ in 0..64 {
                let mut expected = fastrand::Rng::with_seed(locked.u64(..));
                let mut forked = atomic.fork();
                assert_eq!(forked.get_seed(), expected.get_seed());
                assert_eq!(forked.u64(..), expected.u64(..));
            }
            assert_eq!(atomic.0.load(Ordering::Relaxed), locked.get_seed());
        }
    }

    /// Forks from several threads each take one place in the sequence: together they are
    /// the sequence's first values, none twice.
    #[test]
    fn concurrent_forks_take_distinct_places() {
        let atomic = Arc::new(JitterSeed::with_seed(7));
        let mut seeds: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let atomic = atomic.clone();
                    s.spawn(move || {
                        (0..100)
                            .map(|_| atomic.fork().get_seed())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut locked = fastrand::Rng::with_seed(7);
        let mut expected: Vec<u64> = (0..400).map(|_| locked.u64(..)).collect();
        seeds.sort_unstable();
        expected.sort_unstable();
        assert_eq!(seeds, expected);
    }
}
