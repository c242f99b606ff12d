//! [`QuotaBoard`]: the shared state of limits, buckets, server snapshots and wait queues.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::error::{AcquireError, AcquireErrorKind};
use super::local::{Check, Enqueued, Grant, LocalBackend, Origin, Outcome, QuotaLook, WaitPoll};
use super::prompt_cache::{DEFAULT_PREFIX_CAPACITY, PromptCacheMemory};
use super::types::{BucketHeadroom, Cost, Headroom, Limits, QuotaStatus};
use crate::anthropic::{KeyId, RateLimitGroup, RateLimitSnapshot};
use crate::tenant::Tenant;

#[cfg(feature = "redis")]
use super::redis::{self, RedisOptions, RedisSetupError, RedisShared, RedisStatus, RemoteGrant};

/// The default time after which an idle, full entry is forgotten.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Shared quota state per `(key id, rate-limit group)`: limits (configured, or learned from
/// `anthropic-ratelimit-*-limit` headers), three continuous token buckets (requests, input
/// tokens, output tokens), the last server snapshot, and one queue of waiting requests:
/// weighted-fair across tenants, FIFO within a tenant ([`tenant::fair`](crate::tenant::fair);
/// plain FIFO when no request carries a [`Tenant`]).
///
/// Cloning is cheap (an `Arc`); every clone sees the same state, so a board given to several
/// layers and services makes them share buckets and one queue.
///
/// * Writers: [`acquire`](QuotaBoard::acquire) / [`try_acquire`](QuotaBoard::try_acquire)
///   return a [`Reservation`], settled from the real usage or refunded;
///   [`observe`](QuotaBoard::observe) re-seeds from response headers.
/// * Readers (fallback, key pool, metrics, status page): [`headroom`](QuotaBoard::headroom),
///   [`fits_now`](QuotaBoard::fits_now), [`time_until_fits`](QuotaBoard::time_until_fits),
///   [`statuses`](QuotaBoard::statuses).
///
/// **Unknown limits.** Without configured limits for a group, the first request of a
/// `(key, group)` is sent alone as a probe; the limits in its response headers then create the
/// buckets. If the response carries no rate-limit headers at all, that `(key, group)` is not
/// limited. Processes sharing a key without a shared backend each declare their part of the
/// learned limits with [`QuotaBoardBuilder::local_share`].
///
/// **The server's view.** Every response's `anthropic-ratelimit-*` headers lower local levels
/// that are above the server's `remaining` (other clients of the organisation use the same
/// quota). The headers of a successful answer, given to
/// [`Reservation::observe`], also raise levels the answer proves too low (a limit raised
/// upstream, another client that stopped), minus everything admitted since and in flight.
/// A configured limit below the server's, or a local share, is never raised.
///
/// **Memory.** Entries that are idle (no waiter, nothing in flight, every bucket full) for the
/// idle timeout (5 minutes by default) are evicted, amortised over insertions.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::anthropic::{KeyId, RateLimitGroup};
/// use tower_claude::quota::{Cost, Limits, QuotaBoard};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let group = RateLimitGroup::new("claude-sonnet-4");
/// let board = QuotaBoard::builder()
///     .limits(group.clone(), Limits { rpm: 50, itpm: 30_000, otpm: 8_000 })
///     .build();
/// let key = KeyId::named("team-a");
///
/// // Reserve 1 request, 1 000 input tokens and max_tokens = 4 000 output tokens.
/// let reservation = board.acquire(key.clone(), group.clone(), Cost::new(1, 1_000, 4_000)).await.unwrap();
/// assert!(!board.fits_now(&key, &group, &Cost::new(1, 0, 5_000)));
/// // The answer used 300 output tokens: the other 3 700 are available again at once.
/// reservation.settle(Cost::new(1, 1_000, 300));
/// assert!(board.fits_now(&key, &group, &Cost::new(1, 0, 7_000)));
/// let headroom = board.headroom(&key, &group).unwrap();
/// assert_eq!(headroom.output_tokens.unwrap().remaining, 7_700);
/// # }
/// ```
#[derive(Clone)]
pub struct QuotaBoard {
    backend: Backend,
    /// Prompt-cache prefixes and cache-token totals (see [`QuotaBoard::prompt_cache`]).
    prompt_cache: PromptCacheMemory,
}

impl fmt::Debug for QuotaBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaBoard")
            .field("backend", &self.backend.name())
            .field("entries", &self.len())
            .finish()
    }
}

impl Default for QuotaBoard {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`QuotaBoard`].
///
/// ```
/// use std::time::Duration;
/// use tower_claude::anthropic::RateLimitGroup;
/// use tower_claude::quota::{Limits, QuotaBoard};
///
/// let board = QuotaBoard::builder()
///     .limits(RateLimitGroup::new("claude-opus-4"), Limits::new(50, 30_000, 8_000))
///     .default_limits(Limits::new(50, 50_000, 10_000))
///     .idle_timeout(Duration::from_secs(60))
///     .local_share(0.5) // one of two processes sharing the key
///     .build();
/// assert_eq!(board.limits(&RateLimitGroup::new("other")), Some(Limits::new(50, 50_000, 10_000)));
/// ```
#[derive(Debug, Clone)]
pub struct QuotaBoardBuilder {
    pub(super) limits: HashMap<RateLimitGroup, Limits>,
    pub(super) key_limits: HashMap<(KeyId, RateLimitGroup), Limits>,
    pub(super) default_limits: Option<Limits>,
    pub(super) idle_timeout: Duration,
    pub(super) local_share: f64,
    pub(super) prompt_cache_capacity: u64,
}

impl QuotaBoardBuilder {
    /// Configured limits for `group` (for every key).
    pub fn limits(mut self, group: RateLimitGroup, limits: Limits) -> Self {
        self.limits.insert(group, limits);
        self
    }

    /// Configured limits for one key in `group` (keys of different usage tiers); they take
    /// precedence over the group's.
    pub fn key_limits(mut self, key: KeyId, group: RateLimitGroup, limits: Limits) -> Self {
        self.key_limits.insert((key, group), limits);
        self
    }

    /// Configured limits for groups not named with [`limits`](Self::limits). Without them,
    /// limits are learned from response headers.
    pub fn default_limits(mut self, limits: Limits) -> Self {
        self.default_limits = Some(limits);
        self
    }

    /// How long an idle, full entry is kept (5 minutes by default).
    pub fn idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// The part of a *learned* limit this board may use, in `(0, 1]` (1 by default). When
    /// several processes share an API key without a shared backend, give each its share (two
    /// proxy nodes: 0.5) so that together they stay under the key's limits. Configured limits
    /// are used as given.
    pub fn local_share(mut self, share: f64) -> Self {
        self.local_share = share;
        self
    }

    /// How many prompt-cache prefixes the board remembers (20,000 by default, about 7 MB at
    /// most; see [`PromptCacheMemory`]).
    pub fn prompt_cache_capacity(mut self, prefixes: u64) -> Self {
        self.prompt_cache_capacity = prefixes;
        self
    }

    /// Builds the board with the in-process backend.
    pub fn build(self) -> QuotaBoard {
        let capacity = self.prompt_cache_capacity;
        QuotaBoard::with_backend(Backend::Local(Arc::new(self.local_backend())))
            .with_prompt_cache_capacity(capacity)
    }

    /// Builds a board whose buckets live in Redis at `url` (`redis://host:port/db`), shared
    /// with every process that uses the same Redis and key prefix. See the
    /// [`quota::redis`](crate::quota::redis) notes on the `redis` feature.
    ///
    /// Connects once (within the connect timeout). An unreachable server is not an error: the
    /// board starts on local limits (or refusing, when failing closed) and switches to Redis
    /// when a background probe reaches it. Must be called within a Tokio runtime.
    ///
    /// Errors: [`InvalidUrl`](crate::quota::RedisSetupErrorKind::InvalidUrl).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn build_redis(
        self,
        url: &str,
        options: RedisOptions,
    ) -> Result<QuotaBoard, RedisSetupError> {
        // The board used while Redis is down: this process's share of every limit.
        let share = options.share();
        let fallback = QuotaBoardBuilder {
            limits: self
                .limits
                .iter()
                .map(|(g, l)| (g.clone(), redis::share_of(*l, share)))
                .collect(),
            key_limits: self
                .key_limits
                .iter()
                .map(|(k, l)| (k.clone(), redis::share_of(*l, share)))
                .collect(),
            default_limits: self.default_limits.map(|l| redis::share_of(l, share)),
            idle_timeout: self.idle_timeout,
            local_share: self.local_share * share,
            prompt_cache_capacity: self.prompt_cache_capacity,
        }
        .build();
        let capacity = self.prompt_cache_capacity;
        let mirror = Arc::new(
            self.local_backend()
                .mirroring()
                .with_changes(fallback.changes()),
        );
        let shared = RedisShared::connect(url, options, mirror.clone()).await?;
        let fallback = Arc::new(fallback);
        Ok(QuotaBoard::with_backend(Backend::Redis {
            mirror,
            shared,
            fallback,
        })
        .with_prompt_cache_capacity(capacity))
    }

    fn local_backend(self) -> LocalBackend {
        LocalBackend::new(
            self.limits,
            self.key_limits,
            self.default_limits,
            self.idle_timeout,
            self.local_share,
        )
    }
}

impl QuotaBoard {
    /// An in-process board with no configured limits (every limit is learned from headers).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A board with no configured limits whose buckets live in Redis at `url`; see
    /// [`QuotaBoardBuilder::build_redis`] (to configure limits too).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn redis(url: &str, options: RedisOptions) -> Result<QuotaBoard, RedisSetupError> {
        QuotaBoard::builder().build_redis(url, options).await
    }

    /// The state of the Redis backend (`None` for an in-process board).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_status(&self) -> Option<RedisStatus> {
        self.backend.redis_status()
    }

    fn with_backend(backend: Backend) -> Self {
        Self {
            backend,
            prompt_cache: PromptCacheMemory::default(),
        }
    }

    /// Replaces the prompt-cache memory with one of `capacity` prefixes (at build).
    pub(super) fn with_prompt_cache_capacity(mut self, capacity: u64) -> Self {
        if capacity != DEFAULT_PREFIX_CAPACITY {
            self.prompt_cache = PromptCacheMemory::new(capacity);
        }
        self
    }

    /// Woken whenever quota of this board may have come back or its limits changed (a
    /// settle, a refund, new headers, a cancelled waiter), for waiters outside the board's
    /// own queues. Listen ([`Changes::listen`](super::local::Changes::listen)) and register
    /// (`Notified::enable`) before checking, then wait.
    pub(crate) fn changes(&self) -> Arc<super::local::Changes> {
        self.backend.local().changes()
    }

    /// Whether quota is taken in a shared store now (Redis reachable): a synchronous
    /// [`try_acquire`](Self::try_acquire) cannot decide there.
    pub(crate) fn is_remote(&self) -> bool {
        self.backend.is_remote()
    }

    /// One look at the shared (Redis) buckets of `(key, group)`, without waiting: for a layer
    /// that weighs several keys (the key pool's admission). `ticket`: the waiter's ticket;
    /// `place`: where it stands in every key's line, and the ticket its successor on this
    /// node takes if this one is served.
    #[cfg(feature = "redis")]
    pub(crate) async fn try_shared(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: Cost,
        ticket: i64,
        place: &mut redis::Place,
    ) -> redis::SharedTry<Reservation> {
        match &self.backend {
            Backend::Local(_) => redis::SharedTry::Acquire,
            Backend::Redis { shared, .. } => shared
                .try_once(key, group, cost, ticket, place)
                .await
                .map(|grant| self.reservation(key.clone(), group.clone(), cost, grant)),
        }
    }

    /// Takes `ticket` out of the Redis line of `(key, group)` (in the background).
    #[cfg(feature = "redis")]
    pub(crate) fn leave_line(&self, key: &KeyId, group: &RateLimitGroup, ticket: i64) {
        match &self.backend {
            Backend::Local(_) => {}
            Backend::Redis { shared, .. } => shared.leave(key, group, ticket),
        }
    }

    /// A builder.
    pub fn builder() -> QuotaBoardBuilder {
        QuotaBoardBuilder {
            limits: HashMap::new(),
            key_limits: HashMap::new(),
            default_limits: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            local_share: 1.0,
            prompt_cache_capacity: DEFAULT_PREFIX_CAPACITY,
        }
    }

    /// Sets the configured limits of `group` (for every key); existing entries are resized and
    /// waiters re-checked.
    pub fn set_limits(&self, group: RateLimitGroup, limits: Limits) {
        if let Some(fallback) = self.backend.fallback() {
            fallback.set_limits(group.clone(), self.backend.share_of(limits));
        }
        self.backend.local().set_limits(group, limits);
    }

    /// Sets the configured limits of one key in `group` (over the group's limits).
    pub fn set_key_limits(&self, key: KeyId, group: RateLimitGroup, limits: Limits) {
        if let Some(fallback) = self.backend.fallback() {
            fallback.set_key_limits(key.clone(), group.clone(), self.backend.share_of(limits));
        }
        self.backend.local().set_key_limits(key, group, limits);
    }

    /// Sets the limits of every group without limits of its own.
    pub fn set_default_limits(&self, limits: Limits) {
        if let Some(fallback) = self.backend.fallback() {
            fallback.set_default_limits(self.backend.share_of(limits));
        }
        self.backend.local().set_default_limits(limits);
    }

    /// The configured limits of `group` (`None`: learned from headers).
    pub fn limits(&self, group: &RateLimitGroup) -> Option<Limits> {
        self.backend.local().limits(None, group)
    }

    /// The configured limits of `key` in `group`: its own, else the group's.
    pub fn key_limits(&self, key: &KeyId, group: &RateLimitGroup) -> Option<Limits> {
        self.backend.local().limits(Some(key), group)
    }

    /// Takes `cost` now if it fits and nobody is queued ahead.
    ///
    /// Errors: [`RequestTooLarge`](AcquireErrorKind::RequestTooLarge), or
    /// [`QueueTimeout`](AcquireErrorKind::QueueTimeout) (a zero wait) carrying the time until
    /// it would fit.
    pub fn try_acquire(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: Cost,
    ) -> Result<Reservation, AcquireError> {
        if let Some(fallback) = self.backend.degraded() {
            return fallback.try_acquire(key, group, cost);
        }
        match self.try_acquire_inner(key, group, &cost) {
            Ok(grant) => Ok(self.reservation(key.clone(), group.clone(), cost, grant)),
            Err(check) => Err(self.check_error(key, group, check)),
        }
    }

    pub(crate) fn try_acquire_inner(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Result<Grant, Check> {
        self.backend.try_acquire(key, group, cost)
    }

    /// `err` (a [`RequestTooLarge`](AcquireErrorKind::RequestTooLarge) of its key and group)
    /// with the counted `cost` and the limits of the buckets it does not fit
    /// ([`AcquireError::sizes`]).
    pub(crate) fn with_sizes(&self, err: AcquireError, cost: &Cost) -> AcquireError {
        let Some(h) = self.headroom(err.key(), err.group()) else {
            return err;
        };
        let limit = |b: Option<BucketHeadroom>| b.map_or(u64::MAX, |b| b.limit);
        let limits = Limits::new(
            limit(h.requests),
            limit(h.input_tokens),
            limit(h.output_tokens),
        );
        err.with_sizes(*cost, limits)
    }

    pub(crate) fn check_error(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        check: Check,
    ) -> AcquireError {
        let (kind, available_in) = match check {
            Check::TooLarge => (AcquireErrorKind::RequestTooLarge, None),
            Check::Wait(d) => (AcquireErrorKind::QueueTimeout, Some(d)),
            Check::Ready => (AcquireErrorKind::QueueTimeout, Some(Duration::ZERO)),
        };
        AcquireError::new(kind, key.clone(), group.clone(), available_in)
    }

    pub(crate) fn reservation(
        &self,
        key: KeyId,
        group: RateLimitGroup,
        cost: Cost,
        grant: Grant,
    ) -> Reservation {
        Reservation {
            board: self.clone(),
            key,
            group,
            cost,
            grant,
            answered: AtomicBool::new(false),
            done: false,
        }
    }

    /// Waits (in the `(key, group)`'s queue: FIFO, or weighted-fair across tenants with
    /// [`Acquire::tenant`]) until `cost` fits, then takes it.
    ///
    /// The returned future is cancellation-safe: dropping it while queued takes nothing and
    /// lets the next waiter in. Refunds from settled reservations wake waiters at once. Add a
    /// bound with [`Acquire::max_wait`].
    pub fn acquire(&self, key: KeyId, group: RateLimitGroup, cost: Cost) -> Acquire {
        Acquire {
            board: self.clone(),
            key,
            group,
            cost,
            deadline: None,
            tenant: None,
            started: None,
            state: AcquireState::Start,
            sleep: None,
            remote: Default::default(),
        }
    }

    /// Re-seeds `(key, group)` from a response's rate-limit headers: learns limits that are not
    /// configured, and lowers local levels to the server's `remaining` (the server also sees
    /// other clients of the organisation). A token `remaining` of `R` is rounded down by the
    /// server (the truth is in `[R, R + 999]`): it only lowers a level above `R + 999`, and
    /// then to `R`. Levels are never raised here: [`Reservation::observe`] knows which request
    /// the headers answer, and raises too.
    pub fn observe(&self, key: &KeyId, group: &RateLimitGroup, snapshot: &RateLimitSnapshot) {
        #[cfg(test)]
        observations::count();
        self.backend.observe(key, group, snapshot);
    }

    /// [`observe`](Self::observe) for the answer to the request that holds `grant`.
    fn observe_answer(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        snapshot: &RateLimitSnapshot,
        grant: &Grant,
    ) {
        #[cfg(test)]
        observations::count();
        self.backend.observe_answer(key, group, snapshot, grant);
    }

    /// The headroom of `(key, group)`: per bucket remaining and fraction, the binding
    /// fraction, time until full. `None` when no limit is known yet (neither configured nor
    /// learned).
    pub fn headroom(&self, key: &KeyId, group: &RateLimitGroup) -> Option<Headroom> {
        match self.backend.degraded() {
            Some(fallback) => fallback.headroom(key, group),
            None => self.backend.local().headroom(key, group),
        }
    }

    /// Whether `cost` would be admitted right now (fits every known bucket, nobody queued).
    pub fn fits_now(&self, key: &KeyId, group: &RateLimitGroup, cost: &Cost) -> bool {
        match self.backend.degraded() {
            Some(fallback) => fallback.fits_now(key, group, cost),
            None => self.backend.local().fits_now(key, group, cost),
        }
    }

    /// [`headroom`](Self::headroom), [`fits_now`](Self::fits_now) and
    /// [`time_until_fits`](Self::time_until_fits) of `(key, group)` for `cost` from one
    /// lookup.
    pub(crate) fn look(&self, key: &KeyId, group: &RateLimitGroup, cost: &Cost) -> QuotaLook {
        match self.backend.degraded() {
            Some(fallback) => fallback.look(key, group, cost),
            None => self.backend.local().look(key, group, cost),
        }
    }

    /// How long until the buckets hold `cost` by refill alone (ignoring the queue and future
    /// refunds). `None` when it can never fit (larger than a capacity) or depends on a probe.
    pub fn time_until_fits(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Option<Duration> {
        match self.backend.degraded() {
            Some(fallback) => fallback.time_until_fits(key, group, cost),
            None => self.backend.local().time_until_fits(key, group, cost),
        }
    }

    /// Every `(key, group)` the board holds, sorted by key then group, with its prompt-cache
    /// token totals.
    pub fn statuses(&self) -> Vec<QuotaStatus> {
        let mut statuses = self.backend.local().statuses();
        for s in &mut statuses {
            s.prompt_cache = self.prompt_cache.usage(&s.key, &s.group);
        }
        statuses
    }

    /// The prompt-cache memory: which prefixes each key sent to each model recently (for the
    /// cache-aware input estimate) and the cache tokens per `(key, group)`. Every layer given
    /// this board shares it.
    pub fn prompt_cache(&self) -> &PromptCacheMemory {
        &self.prompt_cache
    }

    /// The number of `(key, group)` entries held.
    pub fn len(&self) -> usize {
        self.backend.local().len()
    }

    /// Whether the board holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evicts idle entries now (this also happens automatically as entries are added).
    pub fn evict_idle(&self) {
        self.backend.local().evict_idle()
    }

    /// Whether two handles share the same state.
    pub fn same_board(&self, other: &QuotaBoard) -> bool {
        Arc::ptr_eq(self.backend.local(), other.backend.local())
    }

    /// The mark a layer leaves on a response whose rate-limit headers it fed into this board
    /// (see [`ObservedOn`]).
    pub(crate) fn observed_mark(&self) -> ObservedOn {
        ObservedOn(Arc::as_ptr(self.backend.local()) as usize)
    }

    /// Whether the response whose extensions are `extensions` had its rate-limit headers fed
    /// into this board already (by a layer below: a rate limiter or a key pool on this board).
    pub(crate) fn already_observed(&self, extensions: &http::Extensions) -> bool {
        extensions.get::<ObservedOn>() == Some(&self.observed_mark())
    }

    fn settle_grant(&self, key: &KeyId, group: &RateLimitGroup, grant: &Grant, outcome: Outcome) {
        self.backend.settle(key, group, grant, outcome);
    }
}

/// The store behind a [`QuotaBoard`]: every operation that depends on it is dispatched here,
/// in one `match`, so that the board reads as one code path.
///
/// Both variants keep in-process buckets ([`Backend::local`]): the whole store of a local
/// board, and the mirror of a Redis board (whose atomic scripts are the authority for
/// limited `(key, group)`s; the mirror serves the read views and runs the probes that learn
/// unknown limits; see `quota::redis`).
#[derive(Clone)]
enum Backend {
    /// The in-process store.
    Local(Arc<LocalBackend>),
    /// The Redis store and its in-process mirror.
    #[cfg(feature = "redis")]
    Redis {
        mirror: Arc<LocalBackend>,
        shared: Arc<RedisShared>,
        /// The board that takes quota while Redis is down (and the board fails open): this
        /// process's share of every limit. Its configured limits follow the board's.
        fallback: Arc<QuotaBoard>,
    },
}

/// The Redis side of one [`Acquire`] (nothing without the `redis` feature).
#[cfg(feature = "redis")]
#[derive(Default)]
struct RemoteState {
    /// The Redis path.
    redis: redis::RemoteState,
    /// The acquire on the outage fallback, once the Redis path handed over to it, and the
    /// Redis path's ticket, left (when dropped) as that acquire ends.
    fallback: Option<(Box<Acquire>, redis::Leave)>,
}
/// The Redis side of one [`Acquire`] (nothing without the `redis` feature).
#[cfg(not(feature = "redis"))]
type RemoteState = ();

impl Backend {
    /// Its name in `Debug` output.
    fn name(&self) -> &'static str {
        match self {
            Backend::Local(_) => "local",
            #[cfg(feature = "redis")]
            Backend::Redis { .. } => "redis",
        }
    }

    /// The in-process buckets: the store of a local board, the mirror of a Redis one.
    fn local(&self) -> &Arc<LocalBackend> {
        match self {
            Backend::Local(b) => b,
            #[cfg(feature = "redis")]
            Backend::Redis { mirror, .. } => mirror,
        }
    }

    /// Whether quota is taken in a shared store now (Redis reachable).
    fn is_remote(&self) -> bool {
        match self {
            Backend::Local(_) => false,
            #[cfg(feature = "redis")]
            Backend::Redis { shared, .. } => !shared.serves_fallback(),
        }
    }

    /// The board read while the Redis store is unreachable (its local fallback).
    fn degraded(&self) -> Option<&QuotaBoard> {
        match self {
            Backend::Local(_) => None,
            #[cfg(feature = "redis")]
            Backend::Redis {
                shared, fallback, ..
            } => shared.serves_fallback().then_some(&**fallback),
        }
    }

    /// The board kept for Redis outages, whose configured limits follow the board's.
    fn fallback(&self) -> Option<&QuotaBoard> {
        match self {
            Backend::Local(_) => None,
            #[cfg(feature = "redis")]
            Backend::Redis { fallback, .. } => Some(fallback),
        }
    }

    /// This process's part of `limits` (all of it without a shared store).
    fn share_of(&self, limits: Limits) -> Limits {
        match self {
            Backend::Local(_) => limits,
            #[cfg(feature = "redis")]
            Backend::Redis { shared, .. } => shared.share_of(limits),
        }
    }

    /// The state of the Redis backend.
    #[cfg(feature = "redis")]
    fn redis_status(&self) -> Option<RedisStatus> {
        match self {
            Backend::Local(_) => None,
            Backend::Redis { shared, .. } => Some(shared.status()),
        }
    }

    /// The synchronous take of [`QuotaBoard::try_acquire`].
    fn try_acquire(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        cost: &Cost,
    ) -> Result<Grant, Check> {
        match self {
            Backend::Local(b) => b.try_acquire(key, group, cost),
            #[cfg(feature = "redis")]
            Backend::Redis { mirror, shared, .. } => {
                match shared.try_acquire_check(key, group, cost) {
                    Some(check) => Err(check),
                    None => mirror.try_acquire(key, group, cost),
                }
            }
        }
    }

    /// [`QuotaBoard::observe`].
    fn observe(&self, key: &KeyId, group: &RateLimitGroup, snapshot: &RateLimitSnapshot) {
        match self {
            Backend::Local(b) => b.observe(key, group, snapshot),
            #[cfg(feature = "redis")]
            Backend::Redis {
                mirror,
                shared,
                fallback,
            } => {
                mirror.observe(key, group, snapshot);
                fallback.observe(key, group, snapshot);
                shared.observe(key, group, snapshot);
            }
        }
    }

    /// [`QuotaBoard::observe`] for the answer to the request that holds `grant`.
    fn observe_answer(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        snapshot: &RateLimitSnapshot,
        grant: &Grant,
    ) {
        match self {
            Backend::Local(b) => b.observe_answer(key, group, snapshot, Some(grant)),
            #[cfg(feature = "redis")]
            Backend::Redis {
                mirror,
                shared,
                fallback,
            } => {
                if grant.origin == Origin::Shared {
                    mirror.observe(key, group, snapshot);
                    fallback.observe(key, group, snapshot);
                    shared.observe_answer(key, group, snapshot, Some(grant));
                } else {
                    mirror.observe_answer(key, group, snapshot, Some(grant));
                    fallback.observe(key, group, snapshot);
                    // With the grant: when these headers taught the limits, the store is
                    // charged for the blind grants but this one (its answer counts it).
                    shared.observe_answer(key, group, snapshot, Some(grant));
                }
            }
        }
    }

    /// A queued acquire went away (see [`LocalBackend::cancel`]); a grant it did not collect
    /// is given back, in Redis too when Redis was charged for it.
    fn cancel(&self, key: &KeyId, group: &RateLimitGroup, id: u64) {
        let given_back = self.local().cancel(key, group, id);
        #[cfg(feature = "redis")]
        if let (Backend::Redis { shared, .. }, Some((grant, charged, outcome))) = (self, given_back)
        {
            shared.settle(key, group, &store_grant(&grant, charged), outcome);
        }
        #[cfg(not(feature = "redis"))]
        let _ = given_back;
    }

    /// Settles `grant` in the store that holds it.
    fn settle(&self, key: &KeyId, group: &RateLimitGroup, grant: &Grant, outcome: Outcome) {
        match self {
            Backend::Local(b) => {
                if grant.origin != Origin::Shared {
                    let _ = b.settle(key, group, grant, outcome);
                }
            }
            #[cfg(feature = "redis")]
            Backend::Redis { mirror, shared, .. } => {
                if grant.origin == Origin::Shared {
                    shared.settle(key, group, grant, outcome);
                    mirror.track_shared(key, group, false);
                    return;
                }
                if let Some((charged, outcome)) = mirror.settle(key, group, grant, outcome) {
                    // A blind grant charged in Redis when the limits were seeded there.
                    shared.settle(key, group, &store_grant(grant, charged), outcome);
                }
                // A probe that taught nothing (no headers, an error, dropped) gives up the
                // right to learn the limits; one that did gives it up once Redis holds them.
                if grant.probe && mirror.capacities(key, group).is_none() {
                    shared.release_learn_lock(key, group);
                }
            }
        }
    }

    #[cfg_attr(
        feature = "redis",
        doc = "Drives the Redis path of an [`Acquire`] (see [`redis::poll_remote`]), then the"
    )]
    #[cfg_attr(
        not(feature = "redis"),
        doc = "Drives the Redis path of an [`Acquire`] (see `redis::poll_remote`), then the"
    )]
    /// outage fallback's acquire if Redis is down; wraps a grant into a reservation of
    /// `board`. `None`: the local path applies.
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
    fn poll_remote(
        &self,
        board: &QuotaBoard,
        remote: &mut RemoteState,
        at_start: bool,
        acquire: RemoteArgs<'_>,
        cx: &mut Context<'_>,
    ) -> Option<Poll<Result<Reservation, AcquireError>>> {
        match self {
            Backend::Local(_) => None,
            #[cfg(feature = "redis")]
            Backend::Redis {
                shared, fallback, ..
            } => {
                let (key, group, cost, deadline, tenant) = acquire;
                if remote.fallback.is_none() {
                    let args = (key, group, cost, deadline);
                    match redis::poll_remote(shared, &mut remote.redis, at_start, args, cx)? {
                        Poll::Pending => return Some(Poll::Pending),
                        Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                        Poll::Ready(Ok(RemoteGrant::Granted(grant))) => {
                            let reservation =
                                board.reservation(key.clone(), group.clone(), cost, grant);
                            return Some(Poll::Ready(Ok(reservation)));
                        }
                        Poll::Ready(Ok(RemoteGrant::Fallback(ticket))) => {
                            let outage = fallback
                                .acquire(key.clone(), group.clone(), cost)
                                .deadline(deadline)
                                .tenant_opt(tenant.cloned());
                            remote.fallback = Some((Box::new(outage), ticket));
                        }
                    }
                }
                let (outage, _ticket) = remote.fallback.as_mut()?;
                let polled = Pin::new(&mut **outage).poll(cx);
                if polled.is_ready() {
                    remote.fallback = None;
                }
                Some(polled)
            }
        }
    }
}

/// What the Redis path of an [`Acquire`] needs of it: key, group, cost, deadline, tenant.
type RemoteArgs<'a> = (
    &'a KeyId,
    &'a RateLimitGroup,
    Cost,
    Option<Instant>,
    Option<&'a Tenant>,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcquireState {
    Start,
    Queued(u64),
    Done,
}

/// Future returned by [`QuotaBoard::acquire`]: resolves to a [`Reservation`] once the cost fits
/// and every earlier waiter of the same `(key, group)` has been served.
///
/// Dropping it before completion takes nothing and does not block the queue.
pub struct Acquire {
    board: QuotaBoard,
    key: KeyId,
    group: RateLimitGroup,
    cost: Cost,
    deadline: Option<Instant>,
    /// Whose request this is: its place in the fair queue, and where its wait is counted.
    tenant: Option<Tenant>,
    /// When it was first polled.
    started: Option<Instant>,
    state: AcquireState,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The Redis path (or the local fallback while Redis is down).
    remote: RemoteState,
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("cost", &self.cost)
            .field("deadline", &self.deadline)
            .field("tenant", &self.tenant.as_ref().map(Tenant::name))
            .field("state", &self.state)
            .finish()
    }
}

impl Acquire {
    /// Gives up with a [`QueueTimeout`](AcquireErrorKind::QueueTimeout) error after waiting
    /// this long (measured from now).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.deadline = Instant::now().checked_add(max_wait);
        self
    }

    /// Gives up at `deadline` (`None`: wait as long as it takes).
    pub fn deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Waits in `tenant`'s FIFO of the fair queue (weighted-fair across tenants, `interactive`
    /// before `batch`; see [`tenant::fair`](crate::tenant::fair)) instead of the anonymous
    /// default tenant's, and counts the time waited in its
    /// [`TenantStats::record_queue_wait`](crate::tenant::TenantStats::record_queue_wait).
    /// Takes effect when set before the first poll.
    ///
    /// ```
    /// use tower_claude::anthropic::{KeyId, RateLimitGroup};
    /// use tower_claude::quota::{Cost, Limits, QuotaBoard};
    /// use tower_claude::tenant::Tenant;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let group = RateLimitGroup::new("claude-haiku-4");
    /// let board = QuotaBoard::builder().limits(group.clone(), Limits::new(1, 1_000, 1_000)).build();
    /// let key = KeyId::named("k");
    /// let alice = Tenant::new("alice");
    /// let first = board.acquire(key.clone(), group.clone(), Cost::new(1, 0, 0)).await.unwrap();
    /// first.keep(); // answered: its request stays charged
    /// let second = board.acquire(key, group, Cost::new(1, 0, 0)).tenant(alice.clone()).await.unwrap();
    /// assert!(alice.stats().queue_wait().as_secs() >= 59);
    /// # drop(second);
    /// # }
    /// ```
    pub fn tenant(mut self, tenant: Tenant) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets the tenant, if any (see [`tenant`](Self::tenant)).
    pub(crate) fn tenant_opt(mut self, tenant: Option<Tenant>) -> Self {
        self.tenant = tenant;
        self
    }

    /// Ends the wait with a reservation for `grant`.
    fn granted(&mut self, grant: Grant) -> Poll<Result<Reservation, AcquireError>> {
        if let Some(started) = self.started.filter(|_| self.state != AcquireState::Start) {
            let waited = started.elapsed();
            let tenant = self.tenant.as_ref().map_or("", Tenant::name);
            tracing::debug!(
                key = %self.key,
                group = %self.group,
                tenant,
                waited_ms = waited.as_millis() as u64,
                "quota: admitted from the queue"
            );
            if let Some(t) = &self.tenant {
                t.stats().record_queue_wait(waited);
            }
        }
        self.state = AcquireState::Done;
        Poll::Ready(Ok(self.board.reservation(
            self.key.clone(),
            self.group.clone(),
            self.cost,
            grant,
        )))
    }

    /// Ends the wait: the cost can never fit the buckets.
    fn too_large(&mut self) -> Poll<Result<Reservation, AcquireError>> {
        self.state = AcquireState::Done;
        Poll::Ready(Err(self.board.check_error(
            &self.key,
            &self.group,
            Check::TooLarge,
        )))
    }

    fn arm(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(s) => {
                if s.deadline() != at {
                    s.as_mut().reset(at);
                }
            }
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        match &mut self.sleep {
            Some(s) => s.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Future for Acquire {
    type Output = Result<Reservation, AcquireError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let started = *this.started.get_or_insert_with(Instant::now);
        if let Some(polled) = this.board.backend.poll_remote(
            &this.board,
            &mut this.remote,
            this.state == AcquireState::Start,
            (
                &this.key,
                &this.group,
                this.cost,
                this.deadline,
                this.tenant.as_ref(),
            ),
            cx,
        ) {
            if let Poll::Ready(r) = &polled {
                if let (Ok(_), Some(t)) = (r, &this.tenant) {
                    t.stats().record_queue_wait(started.elapsed());
                }
                this.state = AcquireState::Done;
            }
            return polled;
        }
        // A timer can fire exactly when capacity returns; loop a bounded number of times
        // instead of returning Pending with an already-elapsed timer.
        for _ in 0..4 {
            let id = match this.state {
                AcquireState::Done => {
                    return Poll::Ready(Err(AcquireError::new(
                        AcquireErrorKind::QueueTimeout,
                        this.key.clone(),
                        this.group.clone(),
                        None,
                    )));
                }
                AcquireState::Start => {
                    let enq = this.board.backend.local().enqueue(
                        &this.key,
                        &this.group,
                        &this.cost,
                        this.tenant.as_ref(),
                    );
                    match enq {
                        Enqueued::Granted(grant) => return this.granted(grant),
                        Enqueued::TooLarge => return this.too_large(),
                        Enqueued::Queued(id) => {
                            tracing::debug!(
                                key = %this.key,
                                group = %this.group,
                                tenant = this.tenant.as_ref().map_or("", Tenant::name),
                                "quota: queued"
                            );
                            this.state = AcquireState::Queued(id);
                            id
                        }
                    }
                }
                AcquireState::Queued(id) => id,
            };
            let polled = this.board.backend.local().poll_waiter(
                &this.key,
                &this.group,
                id,
                cx.waker(),
                this.deadline,
            );
            match polled {
                WaitPoll::Granted(grant) => return this.granted(grant),
                WaitPoll::TooLarge => return this.too_large(),
                WaitPoll::TimedOut(available_in) => {
                    this.state = AcquireState::Done;
                    return Poll::Ready(Err(AcquireError::new(
                        AcquireErrorKind::QueueTimeout,
                        this.key.clone(),
                        this.group.clone(),
                        available_in,
                    )));
                }
                WaitPoll::Released => {
                    // The limits are known now and live in the shared store: start over on
                    // its path (at the next poll, which `poll_remote` takes).
                    this.state = AcquireState::Start;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                WaitPoll::Pending(timer) => {
                    let wake_at = match (timer, this.deadline) {
                        (Some(t), Some(d)) => Some(t.min(d)),
                        (t, d) => t.or(d),
                    };
                    match wake_at {
                        None => return Poll::Pending,
                        Some(at) => {
                            if this.arm(at, cx).is_pending() {
                                return Poll::Pending;
                            }
                        }
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let AcquireState::Queued(id) = self.state {
            self.board.backend.cancel(&self.key, &self.group, id);
        }
    }
}

/// A blind grant of the mirror as the Redis store holds it once the limits were seeded there
/// with it (`charged`: see `LocalBackend::blind_to_store`): settled there without an id (it
/// was never in the store's grants).
#[cfg(feature = "redis")]
fn store_grant(grant: &Grant, charged: [Option<u64>; 3]) -> Grant {
    Grant {
        charged,
        origin: Origin::Shared,
        id: 0,
        ..*grant
    }
}

/// Quota already taken for the request that carries it: a request extension set by a layer
/// that admits requests itself (the [`KeyPool`](crate::key_pool::KeyPool), which chooses the
/// key by earliest admission), so that the
/// [`RateLimit`](crate::rate_limit::RateLimit) layer below uses this reservation instead of
/// acquiring again. It takes it only when the request's key and group match.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::anthropic::{KeyId, RateLimitGroup};
/// use tower_claude::quota::{Admission, Cost, QuotaBoard};
///
/// let board = QuotaBoard::new();
/// let (key, group) = (KeyId::named("k"), RateLimitGroup::new("claude-opus-4"));
/// let reservation = board.try_acquire(&key, &group, Cost::new(1, 100, 100)).unwrap();
/// let admission = Admission::new(reservation, Duration::from_millis(40));
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(admission);
/// // The layer below:
/// let admission = req.extensions_mut().remove::<Admission>().unwrap();
/// assert!(admission.take(&KeyId::named("other"), &group).is_none());
/// let (reservation, waited) = admission.take(&key, &group).unwrap();
/// assert_eq!(waited, Duration::from_millis(40));
/// reservation.refund();
/// ```
#[derive(Clone)]
pub struct Admission {
    reservation: Arc<std::sync::Mutex<Option<Reservation>>>,
    key: KeyId,
    group: RateLimitGroup,
    waited: Duration,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("waited", &self.waited)
            .finish()
    }
}

impl Admission {
    /// Carries `reservation`, taken after waiting `waited` for quota.
    pub fn new(reservation: Reservation, waited: Duration) -> Self {
        Self {
            key: reservation.key.clone(),
            group: reservation.group.clone(),
            reservation: Arc::new(std::sync::Mutex::new(Some(reservation))),
            waited,
        }
    }

    /// The reservation and the time waited for it, when it is for `key` in `group` and not
    /// taken yet. A reservation nobody takes stays charged as reserved when the last clone
    /// of the admission is dropped (like a dropped [`Reservation`]).
    pub fn take(&self, key: &KeyId, group: &RateLimitGroup) -> Option<(Reservation, Duration)> {
        if &self.key != key || &self.group != group {
            return None;
        }
        let mut slot = self.reservation.lock().unwrap_or_else(|e| e.into_inner());
        slot.take().map(|r| (r, self.waited))
    }
}

/// Quota taken for one request, to be settled once when its real cost is known.
///
/// * [`settle`](Reservation::settle) with the real cost: the unused part is refunded at once
///   (waking waiters), an overrun is charged (the bucket may go into debt).
/// * [`settle_rejected`](Reservation::settle_rejected): the server answered with an error
///   status; only the request unit stays charged.
/// * [`refund`](Reservation::refund): the request never reached the server; everything,
///   including the request unit, is given back.
/// * [`keep`](Reservation::keep): the server answered but the real cost is unknown; what was
///   reserved stays charged.
/// * Dropped without any of these: the reservation stays charged as reserved (the request may
///   have been served; refill returns the quota). A dropped probe (the first request of a
///   group whose limits are unknown) lets the next request probe; it teaches nothing.
pub struct Reservation {
    board: QuotaBoard,
    key: KeyId,
    group: RateLimitGroup,
    cost: Cost,
    grant: Grant,
    /// The answer's headers were observed (the server has seen the request).
    answered: AtomicBool,
    done: bool,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("key", &self.key)
            .field("group", &self.group)
            .field("cost", &self.cost)
            .field("charged", &self.charged())
            .finish()
    }
}

impl Reservation {
    /// The key id charged.
    pub fn key(&self) -> &KeyId {
        &self.key
    }

    /// The rate-limit group charged.
    pub fn group(&self) -> &RateLimitGroup {
        &self.group
    }

    /// The board charged.
    pub(crate) fn board(&self) -> &QuotaBoard {
        &self.board
    }

    /// The cost asked for.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// What was actually taken from each bucket (0 for a bucket whose limit was unknown; the
    /// output reservation is clamped to the output bucket's capacity).
    pub fn charged(&self) -> Cost {
        let c = self.grant.charged.map(|c| c.unwrap_or(0));
        Cost::new(c[0], c[1], c[2])
    }

    /// Re-seeds the board from the rate-limit headers of this request's *successful* answer:
    /// like [`QuotaBoard::observe`] (learns limits, lowers levels above the server's view),
    /// and also **raises** levels that the answer proves too low — a limit raised upstream,
    /// or another client of the key that stopped. The raise subtracts everything this board
    /// admitted after this request (the server may not have seen it) and every other request
    /// still in flight (this one is in the server's count already), so work in flight is
    /// never counted twice. For an answer to this board's request, a level is lowered only
    /// above what refunds and refill since this request was admitted explain (its
    /// `remaining` predates them). Call it before settling.
    ///
    /// ```
    /// use tower_claude::anthropic::{BucketSnapshot, KeyId, RateLimitGroup, RateLimitSnapshot};
    /// use tower_claude::quota::{Cost, Limits, QuotaBoard};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let (key, group) = (KeyId::named("k"), RateLimitGroup::new("claude-opus-4"));
    /// let board = QuotaBoard::new();
    /// // The first answer teaches a limit of 60 requests a minute, 10 left.
    /// let probe = board.acquire(key.clone(), group.clone(), Cost::new(1, 0, 0)).await.unwrap();
    /// let snap = |limit, remaining| RateLimitSnapshot {
    ///     requests: BucketSnapshot { limit: Some(limit), remaining: Some(remaining), reset: None },
    ///     ..Default::default()
    /// };
    /// probe.observe(&snap(60, 10));
    /// probe.settle(Cost::new(1, 0, 0));
    /// let r = board.acquire(key.clone(), group.clone(), Cost::new(1, 0, 0)).await.unwrap();
    /// // The organisation moved up a tier: 240 a minute, 200 left when this request was served.
    /// r.observe(&snap(240, 200));
    /// // The server's 200 already count this request.
    /// assert_eq!(board.headroom(&key, &group).unwrap().requests.unwrap().remaining, 200);
    /// # }
    /// ```
    pub fn observe(&self, snapshot: &crate::anthropic::RateLimitSnapshot) {
        let grant = Grant {
            answered: self.answered.swap(true, Ordering::Relaxed),
            ..self.grant
        };
        self.board
            .observe_answer(&self.key, &self.group, snapshot, &grant);
    }

    /// Settles with the real cost.
    pub fn settle(mut self, actual: Cost) {
        self.finish(Outcome::Actual(actual));
    }

    /// [`settle`](Self::settle) in place, for a holder that keeps the reservation until it
    /// drops (the rate limiter's body): a reservation is a few hundred bytes, and moving it
    /// out of its holder to settle it was two copies (issue 14, sixteenth pass). Settles
    /// once: a reservation settled (or kept) already is left as it is.
    pub(crate) fn settle_in_place(&mut self, actual: Cost) {
        self.finish(Outcome::Actual(actual));
    }

    /// [`keep`](Self::keep) in place (see [`settle_in_place`](Self::settle_in_place)).
    pub(crate) fn keep_in_place(&mut self) {
        self.finish(Outcome::Served);
    }

    /// Whether the reservation was settled, kept or refunded already.
    pub(crate) fn is_finished(&self) -> bool {
        self.done
    }

    /// Settles a request the server refused with an error status (429, 529, 4xx, 5xx): the
    /// request unit stays charged, the tokens are refunded (the API does not charge them).
    pub fn settle_rejected(mut self) {
        self.finish(Outcome::Rejected);
    }

    /// Settles a request the server refused because it does not know its key or its model
    /// (401, 403, 404: [`settle_rejected`](Self::settle_rejected) for any other error status).
    /// The cost is settled as for `settle_rejected`; in addition, an entry the server never
    /// answered with a success (and whose key has no limits of its own) is forgotten, so that
    /// made-up model names or API keys cannot grow the board.
    ///
    /// ```
    /// use tower_claude::anthropic::{KeyId, RateLimitGroup};
    /// use tower_claude::quota::{Cost, QuotaBoard};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let board = QuotaBoard::new();
    /// let (key, group) = (KeyId::named("team-a"), RateLimitGroup::new("claude-typo-4"));
    /// let r = board.acquire(key, group, Cost::new(1, 100, 100)).await.unwrap();
    /// r.settle_unknown(); // upstream answered 404 not_found_error
    /// assert_eq!(board.len(), 0);
    /// # }
    /// ```
    pub fn settle_unknown(mut self) {
        self.finish(Outcome::Unknown);
    }

    /// Gives everything back: the request never reached the server.
    pub fn refund(mut self) {
        self.finish(Outcome::Refund);
    }

    /// Keeps what was reserved: the server answered with a success, but its real cost is
    /// unknown (no `usage` in the body). Unlike a dropped reservation, this says the request
    /// was answered: when it was the probe of unknown limits and the answer carried no
    /// rate-limit headers, the board stops probing and stops enforcing for that group.
    ///
    /// ```
    /// use tower_claude::anthropic::{KeyId, RateLimitGroup};
    /// use tower_claude::quota::{Cost, QuotaBoard};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let board = QuotaBoard::new();
    /// let (key, group) = (KeyId::named("team-a"), RateLimitGroup::new("claude-sonnet-4"));
    /// let probe = board.acquire(key.clone(), group.clone(), Cost::new(1, 100, 100)).await.unwrap();
    /// probe.keep(); // answered, no rate-limit headers seen: nothing to enforce
    /// assert!(board.try_acquire(&key, &group, Cost::new(1, 100, 100)).is_ok());
    /// # }
    /// ```
    pub fn keep(mut self) {
        self.finish(Outcome::Served);
    }

    fn finish(&mut self, outcome: Outcome) {
        if !self.done {
            self.done = true;
            let grant = Grant {
                answered: self.answered.load(Ordering::Relaxed),
                ..self.grant
            };
            self.board
                .settle_grant(&self.key, &self.group, &grant, outcome);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.finish(Outcome::Keep);
    }
}

/// Response extension (crate-private): the rate-limit headers of this answer were fed into the
/// board with this identity (the address of its shared state, alive as long as the layer that
/// wrote the mark holds the board). A layer above that reads the same board — fallback — does
/// not feed them again: headers reach a board once per upstream answer (with Redis each
/// observation is a script call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ObservedOn(usize);

/// Test-only count of the observations fed into boards on this thread (`observe` and a
/// reservation's `observe`), to check that an answer reaches its board once.
#[cfg(test)]
pub(crate) mod observations {
    use std::cell::Cell;

    thread_local!(static COUNT: Cell<usize> = const { Cell::new(0) });

    pub(super) fn count() {
        COUNT.with(|c| c.set(c.get() + 1));
    }

    /// Observations so far on this thread.
    pub(crate) fn get() -> usize {
        COUNT.with(Cell::get)
    }
}
