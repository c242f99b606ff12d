//! [`ClaudeStack`]: every layer of the crate, stacked in the recommended order around one
//! inner service, sharing one [`QuotaBoard`].
//!
//! ```text
//! caller
//!   MetricsLayer      what the caller sees: latency, status, tokens, retries, cache, fallback
//!   CacheLayer        identical request (same tenant) -> stored response; twins coalesce
//!   BudgetLayer       (optional) each tenant's dollars per day / month: 429 at budget, cost settled
//!   FallbackLayer     choose the model by remaining quota; fail over on exhaustion
//!   RetryLayer        429 / 529 / 5xx / connect errors; retry-after; spread; deadline
//!   TenantLimitLayer  a tenant's own limits per group (requests carrying a `Tenant` with limits)
//!   KeyPoolLayer      (optional) the API key with the most headroom; cool down keys on 429
//!   PacingLayer       (optional, feature `metrics`) space admissions when the forecast nears the quota
//!   RateLimitLayer    token buckets: requests, input and output tokens per (key, group)
//!   ConcurrencyLayer  cap on in-flight requests (fixed, adaptive, ramped up), held until the body ends
//! inner service       HttpClient to api.anthropic.com, MockClaude, or anything
//! ```
//!
//! Retry sits outside the limiter so that every attempt pays for its tokens again; fallback
//! sits outside retry so that a model whose quota is gone is abandoned at once instead of
//! retried into; the cache is outermost so that a hit costs no quota at all. The tenant limit
//! sits above the key pool, which takes upstream quota as it admits a request: a tenant
//! waiting for its own limit holds none. See
//! `docs/architecture.md` for what each layer reads and writes.
//!
//! # Which board a layer uses
//!
//! The stack's board ([`ClaudeStack::board`], a fresh one by default) is given to every layer
//! that reads or feeds a board — rate limit, pacing, key pool, fallback, metrics — **unless
//! the layer was given a board of its own** with its `board(..)` builder: a board set on a
//! layer wins, and that layer then neither reads nor feeds the stack's (a fallback on another
//! board than the rate limiter's does not see the requests queued below it). The tenant limit
//! always keeps its own board (its keys are tenants). The stack's model catalogue replaces
//! every layer's. [`ClaudeStack::service`] composes the layers with their concrete types and
//! boxes twice: under retry (whose future holds the service below, the attempt and the answer
//! it reads ahead) and at the top.
//!
//! ```
//! use std::time::Duration;
//! use http::Request;
//! use tower::ServiceExt;
//! use tower_claude::body::RequestBody;
//! use tower_claude::stack::{ClaudeStack, StackConfig};
//!
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! use tower_claude::testing::MockClaude; // feature `testing`
//!
//! let stack = ClaudeStack::from_config(&StackConfig::default())?;
//! let board = stack.quota_board().clone(); // for a status page
//! let svc = stack.service(MockClaude::builder().build());
//!
//! let req = Request::post("/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .body(RequestBody::from(
//!         r#"{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#,
//!     ))?;
//! let resp = svc.oneshot(req).await?;
//! assert_eq!(resp.status(), 200);
//! assert_eq!(board.statuses().len(), 1);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::BoxError;
use crate::anthropic::{ModelCatalog, RateLimitGroup};
use crate::body::RequestBody;
use crate::cache::{CacheLayer, CacheMode};
use crate::concurrency::{Aimd, ConcurrencyHandle, ConcurrencyLayer, RampUp};
use crate::fallback::FallbackLayer;
use crate::key_pool::KeyPoolLayer;
use crate::quota::{Limits, OutputReservation, QuotaBoard};
use crate::rate_limit::RateLimitLayer;
use crate::retry::{RetryBudget, RetryLayer};
use crate::tenant::limit::TenantLimitLayer;

/// The response body of a boxed stack.
pub type ClaudeBody = UnsyncBoxBody<Bytes, BoxError>;

/// A stack boxed into one clonable service.
pub type ClaudeService = BoxCloneSyncService<Request<RequestBody>, Response<ClaudeBody>, BoxError>;

/// Boxes any suitable service into a [`ClaudeService`].
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_claude::{BoxError, body::RequestBody, stack::boxed};
///
/// let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
///     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
/// });
/// let svc = boxed(upstream); // a clonable `ClaudeService`
/// # drop(svc);
/// ```
pub fn boxed<S, B>(service: S) -> ClaudeService
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // One wrapper (not tower's `map_response` then `map_err`, each a future that the next one
    // moves): the inner future is moved once, into the box `BoxCloneSyncService` makes.
    BoxCloneSyncService::new(BoxBody(service))
}

/// Gives a service's answers the [`ClaudeBody`] and [`BoxError`] of a [`ClaudeService`] (the
/// service of [`boxed`]).
#[derive(Clone)]
struct BoxBody<S>(S);

impl<S, B> Service<Request<RequestBody>> for BoxBody<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ClaudeBody>;
    type Error = BoxError;
    type Future = BoxBodyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        BoxBodyFuture {
            inner: self.0.call(req),
        }
    }
}

/// The response future of [`BoxBody`].
#[pin_project::pin_project]
struct BoxBodyFuture<F> {
    #[pin]
    inner: F,
}

impl<F, B, E> Future for BoxBodyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ClaudeBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().inner.poll(cx)) {
            Ok(response) => Ok(response.map(|body| body.map_err(Into::into).boxed_unsync())),
            Err(err) => Err(err.into()),
        })
    }
}

/// Where cached responses live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CacheConfig {
    /// No cache.
    Off,
    /// In memory, bounded by bytes.
    Memory {
        /// Size bound in bytes.
        max_bytes: u64,
    },
    /// In an embedded redb file that survives restarts (feature `disk-cache`).
    Disk {
        /// The file.
        path: PathBuf,
        /// Size bound in bytes.
        max_bytes: u64,
    },
    /// In memory, 64 MiB (the default).
    #[default]
    DefaultMemory,
}

#[cfg_attr(
    feature = "metrics",
    doc = "Predictive throttling settings ([`PacingLayer`](crate::metrics::pacing::PacingLayer),"
)]
#[cfg_attr(
    not(feature = "metrics"),
    doc = "Predictive throttling settings (`PacingLayer`,"
)]
/// feature `metrics`): when a group's demand forecast reaches `trigger` of a limit, its
/// requests are spaced at `target` of the limit; with `ramp`, the released request rate rises
/// by at most that many requests per minute, every minute.
///
/// ```
/// use tower_claude::stack::{PacingConfig, StackConfig};
///
/// let config = StackConfig {
///     pacing: Some(PacingConfig { trigger: 0.7, ramp: Some(30.0), ..PacingConfig::default() }),
///     ..StackConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingConfig {
    /// Share of a limit the forecast must reach to start pacing. Default: 0.8.
    pub trigger: f64,
    /// Share of a limit admissions are paced at. Default: 0.95.
    pub target: f64,
    /// Most extra requests per minute, minute over minute (acceleration limits). Default: none.
    pub ramp: Option<f64>,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            trigger: 0.8,
            target: 0.95,
            ramp: None,
        }
    }
}

/// Plain-data configuration of a [`ClaudeStack`]. Every layer can be switched off.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::stack::{CacheConfig, StackConfig};
///
/// let config = StackConfig {
///     max_in_flight: Some(16),
///     max_attempts: 6,
///     deadline: Some(Duration::from_secs(300)),
///     cache: CacheConfig::Memory { max_bytes: 16 << 20 },
///     ..StackConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Whether requests wait for quota locally (`RateLimitLayer`). Default: on.
    pub rate_limit: bool,
    /// Known limits per rate-limit group; groups not listed learn them from response headers.
    pub limits: BTreeMap<String, Limits>,
    /// How much output quota a request reserves up front. Default: its `max_tokens`.
    pub output_reservation: OutputReservation,
    /// Longest wait in the rate limiter's queue (`None`: bounded only by the deadline).
    pub max_queue_wait: Option<Duration>,
    /// Cap on in-flight requests (`ConcurrencyLayer`). Default: none.
    pub max_in_flight: Option<usize>,
    /// An adaptive cap on in-flight requests instead ([`Aimd`]: halves on 429 / 529, grows
    /// back by one after a cap's worth of successes); overrides `max_in_flight`. Default: none.
    pub adaptive_concurrency: Option<Aimd>,
    /// How fast the concurrency cap may grow ([`RampUp`]), with `max_in_flight` or
    /// `adaptive_concurrency` (an error without either). Default: none.
    pub concurrency_ramp_up: Option<RampUp>,
    /// Whether failed calls are retried (`RetryLayer`). Default: on.
    pub retry: bool,
    /// Attempts per request, the first included. Default: 8.
    pub max_attempts: u32,
    /// Cap on any single retry wait. Default: 90 s.
    pub max_retry_delay: Duration,
    /// Longest time a request may take, waits included. Default: none.
    pub deadline: Option<Duration>,
    /// Seed of the retry jitter (deterministic tests and demos). Default: random.
    pub seed: Option<u64>,
    /// Caps retries to a share of the traffic ([`RetryBudget`], shared by every request of
    /// the stack). Default: none (attempts and deadline bound retries).
    pub retry_budget: Option<RetryBudget>,
    /// Whether model fallback is on (`FallbackLayer`). Default: on.
    pub fallback: bool,
    /// The lowest model fallback may use. Default: the end of the chain.
    pub fallback_floor: Option<String>,
    /// Response cache. Default: 64 MiB in memory.
    pub cache: CacheConfig,
    /// Time to live of cached responses. Default: 4 hours.
    pub cache_ttl: Duration,
    /// Which requests are cached. Default: [`CacheMode::Deterministic`] (`temperature` 0).
    pub cache_mode: CacheMode,
    /// The cache's secret ([`CacheLayer::secret`]). Default: the store's own (random for a
    /// memory cache, kept in the file of a disk cache).
    pub cache_secret: Option<crate::cache::CacheSecret>,
    /// Budgets per tenant ([`BudgetLayer`](crate::tenant::budget::BudgetLayer), between the
    /// cache and fallback: a cache hit costs nothing, and the cost is priced for the model
    /// that answered). Default: none.
    pub budget: Option<crate::tenant::budget::BudgetLayer>,
    /// Model ids, groups and the fallback chain.
    pub catalog: ModelCatalog,
    /// Whether requests are measured (`MetricsLayer`, feature `metrics`). Default: on when
    /// the feature is enabled. The metrics go to whatever recorder the `metrics` facade has
    /// (none installed: they cost next to nothing).
    pub metrics: bool,
    /// Predictive throttling ([`PacingConfig`]; feature `metrics`). A stack with pacing and
    /// no metrics layer gets one, to feed the forecast. Default: off.
    pub pacing: Option<PacingConfig>,
    /// Whether a request's [`Tenant`](crate::tenant::Tenant) is held to the limits of its own
    /// ([`TenantLimitLayer`], waiting at most `max_queue_wait`). Requests without a tenant,
    /// or whose tenant has no limits for the group, pass through. Default: on.
    pub tenant_limit: bool,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            rate_limit: true,
            limits: BTreeMap::new(),
            output_reservation: OutputReservation::default(),
            max_queue_wait: None,
            max_in_flight: None,
            adaptive_concurrency: None,
            concurrency_ramp_up: None,
            retry: true,
            max_attempts: 8,
            max_retry_delay: Duration::from_secs(90),
            deadline: None,
            seed: None,
            retry_budget: None,
            fallback: true,
            fallback_floor: None,
            cache: CacheConfig::default(),
            cache_ttl: Duration::from_secs(4 * 3600),
            cache_mode: CacheMode::default(),
            cache_secret: None,
            budget: None,
            catalog: ModelCatalog::default(),
            metrics: cfg!(feature = "metrics"),
            pacing: None,
            tenant_limit: true,
        }
    }
}

/// A layer's board: its own when it was given one, else the stack's.
macro_rules! own_or_shared {
    ($layer:expr, $board:expr) => {{
        let layer = $layer;
        if layer.board_given() {
            layer
        } else {
            layer.board($board.clone())
        }
    }};
}

/// The preset stack: cache, fallback, retry, rate limit and concurrency layers in the order of
/// the [module docs](self), sharing one [`QuotaBoard`] and one [`ModelCatalog`].
///
/// Build it from a [`StackConfig`], or start from [`ClaudeStack::new`] and replace or remove
/// layers one by one; then wrap an inner service with [`ClaudeStack::service`].
#[derive(Clone)]
pub struct ClaudeStack {
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::MetricsLayer>,
    board: QuotaBoard,
    catalog: ModelCatalog,
    cache: Option<CacheLayer>,
    budget: Option<crate::tenant::budget::BudgetLayer>,
    fallback: Option<FallbackLayer>,
    retry: Option<RetryLayer>,
    tenant_limit: Option<TenantLimitLayer>,
    key_pool: Option<KeyPoolLayer>,
    #[cfg(feature = "metrics")]
    pacing: Option<crate::metrics::pacing::PacingLayer>,
    rate_limit: Option<RateLimitLayer>,
    concurrency: Option<ConcurrencyLayer>,
}

impl std::fmt::Debug for ClaudeStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClaudeStack");
        #[cfg(feature = "metrics")]
        d.field("metrics", &self.metrics.is_some());
        d.field("cache", &self.cache.is_some())
            .field("budget", &self.budget.is_some())
            .field("fallback", &self.fallback.is_some())
            .field("retry", &self.retry.is_some())
            .field("tenant_limit", &self.tenant_limit.is_some())
            .field("key_pool", &self.key_pool.is_some());
        #[cfg(feature = "metrics")]
        d.field("pacing", &self.pacing.is_some());
        d.field("rate_limit", &self.rate_limit.is_some())
            .field("concurrency", &self.concurrency.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ClaudeStack {
    fn default() -> Self {
        Self::new()
    }
}

impl ClaudeStack {
    /// Every layer with its defaults (memory cache, fallback, retry, learned rate limits),
    /// no concurrency cap.
    pub fn new() -> Self {
        Self::from_config(&StackConfig::default())
            .expect("the default configuration has no file to open")
    }

    /// A stack from plain configuration. Fails when a disk cache cannot be opened, or when the
    /// configuration asks for what the build or the other settings cannot give (metrics or
    /// pacing without the `metrics` feature, a ramp-up without a concurrency cap).
    pub fn from_config(config: &StackConfig) -> Result<Self, BoxError> {
        let mut board = QuotaBoard::builder();
        for (group, limits) in &config.limits {
            board = board.limits(RateLimitGroup::new(group), *limits);
        }
        let board = board.build();
        let catalog = config.catalog.clone();

        let cache = match &config.cache {
            CacheConfig::Off => None,
            CacheConfig::DefaultMemory => Some(CacheLayer::memory(64 << 20)),
            CacheConfig::Memory { max_bytes } => Some(CacheLayer::memory(*max_bytes)),
            #[cfg(feature = "disk-cache")]
            CacheConfig::Disk { path, max_bytes } => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                Some(CacheLayer::new(crate::cache::DiskStore::open(
                    path, *max_bytes,
                )?))
            }
            #[cfg(not(feature = "disk-cache"))]
            CacheConfig::Disk { .. } => {
                return Err("a disk cache needs the `disk-cache` feature".into());
            }
        }
        .map(|c| c.ttl(config.cache_ttl).mode(config.cache_mode))
        .map(|c| match &config.cache_secret {
            Some(secret) => c.secret(secret.clone()),
            None => c,
        });

        let fallback = config.fallback.then(|| {
            let layer = FallbackLayer::new();
            match &config.fallback_floor {
                Some(floor) => layer.floor(floor.clone()),
                None => layer,
            }
        });

        let retry = config.retry.then(|| {
            let mut layer = RetryLayer::new()
                .max_attempts(config.max_attempts.max(1))
                .max_delay(config.max_retry_delay);
            if let Some(deadline) = config.deadline {
                layer = layer.deadline(deadline);
            }
            if let Some(seed) = config.seed {
                layer = layer.seed(seed);
            }
            if let Some(budget) = &config.retry_budget {
                layer = layer.budget(budget.clone());
            }
            layer
        });

        let rate_limit = config.rate_limit.then(|| {
            let layer = RateLimitLayer::new().output_reservation(config.output_reservation);
            match config.max_queue_wait {
                Some(wait) => layer.max_wait(wait),
                None => layer,
            }
        });

        let tenant_limit = config.tenant_limit.then(|| {
            let layer = TenantLimitLayer::new().output_reservation(config.output_reservation);
            match config.max_queue_wait {
                Some(wait) => layer.max_wait(wait),
                None => layer,
            }
        });

        let concurrency = match (config.adaptive_concurrency, config.max_in_flight) {
            (Some(aimd), _) => Some(ConcurrencyLayer::adaptive(aimd)),
            (None, Some(max)) => Some(ConcurrencyLayer::new(max)),
            (None, None) => None,
        };
        let concurrency = match (concurrency, config.concurrency_ramp_up) {
            (Some(layer), Some(ramp)) => Some(layer.ramp_up(ramp)),
            (None, Some(_)) => {
                return Err(
                    "a concurrency ramp-up needs a cap to ramp up to: set max_in_flight or \
                     adaptive_concurrency"
                        .into(),
                );
            }
            (layer, None) => layer,
        };

        #[cfg(not(feature = "metrics"))]
        if config.metrics {
            return Err("metrics need the `metrics` feature".into());
        }
        #[cfg(not(feature = "metrics"))]
        if config.pacing.is_some() {
            return Err("pacing needs the `metrics` feature (its forecast)".into());
        }
        #[cfg(feature = "metrics")]
        let pacing = config.pacing.map(|p| {
            let layer = crate::metrics::pacing::PacingLayer::new(
                crate::metrics::forecast::Forecaster::new(),
            )
            .trigger(p.trigger)
            .target(p.target);
            match p.ramp {
                Some(ramp) => layer.ramp(ramp),
                None => layer,
            }
        });

        Ok(Self {
            #[cfg(feature = "metrics")]
            metrics: config.metrics.then(crate::metrics::MetricsLayer::new),
            board,
            catalog,
            cache,
            budget: config.budget.clone(),
            fallback,
            retry,
            tenant_limit,
            key_pool: None,
            #[cfg(feature = "metrics")]
            pacing,
            rate_limit,
            concurrency,
        })
    }

    /// Shares `board` with every layer that has none of its own (e.g. one board for several
    /// stacks, or a Redis board). See [which board a layer uses](self#which-board-a-layer-uses).
    pub fn board(mut self, board: QuotaBoard) -> Self {
        self.board = board;
        self
    }

    /// The board shared by the layers: read it for status pages and metrics.
    pub fn quota_board(&self) -> &QuotaBoard {
        &self.board
    }

    /// Replaces the model catalogue of every layer.
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.catalog = catalog;
        self
    }

    /// Replaces (or with `None` removes) the metrics layer. Its catalogue is the stack's; its
    /// board too unless it was given one ([which board](self#which-board-a-layer-uses)).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, layer: Option<crate::metrics::MetricsLayer>) -> Self {
        self.metrics = layer;
        self
    }

    /// The metrics layer, if any (e.g. to call its `spawn_refresh`). With a pacing layer it
    /// feeds the pacing layer's forecaster (a stack with pacing and no metrics layer gets a
    /// default one).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics_layer(&self) -> Option<crate::metrics::MetricsLayer> {
        let metrics = match (&self.metrics, &self.pacing) {
            (Some(m), _) => Some(m.clone()),
            (None, Some(_)) => Some(crate::metrics::MetricsLayer::new()),
            (None, None) => None,
        };
        metrics.map(|m| {
            let m = m.catalog(self.catalog.clone());
            let m = if m.board_given() {
                m
            } else {
                m.board(self.board.clone())
            };
            match &self.pacing {
                Some(pacing) => m.forecaster(pacing.forecaster().clone()),
                None => m,
            }
        })
    }

    /// Adds (or with `None` removes) predictive throttling between the key pool and the rate
    /// limiter. Its catalogue is the stack's, its board too unless it was given one; the metrics layer feeds its
    /// forecaster (see [`metrics_layer`](Self::metrics_layer)).
    ///
    /// ```
    /// use tower_claude::metrics::forecast::Forecaster;
    /// use tower_claude::metrics::pacing::PacingLayer;
    /// use tower_claude::stack::ClaudeStack;
    ///
    /// let stack = ClaudeStack::new().pacing(Some(PacingLayer::new(Forecaster::new()).trigger(0.7)));
    /// assert!(stack.metrics_layer().is_some());
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn pacing(mut self, layer: Option<crate::metrics::pacing::PacingLayer>) -> Self {
        self.pacing = layer;
        self
    }

    /// Whether the stack paces admissions (a pacing layer is configured).
    pub fn is_paced(&self) -> bool {
        #[cfg(feature = "metrics")]
        return self.pacing.is_some();
        #[cfg(not(feature = "metrics"))]
        false
    }

    /// A handle on the concurrency cap, if the stack has one: its current limit (which moves
    /// in adaptive and ramp-up modes) and the requests in flight.
    ///
    /// ```
    /// use tower_claude::concurrency::RampUp;
    /// use tower_claude::stack::{ClaudeStack, StackConfig};
    ///
    /// let config = StackConfig {
    ///     max_in_flight: Some(16),
    ///     concurrency_ramp_up: Some(RampUp { initial: 2, step: 2, interval: std::time::Duration::from_secs(10) }),
    ///     ..StackConfig::default()
    /// };
    /// let stack = ClaudeStack::from_config(&config).unwrap();
    /// assert_eq!(stack.concurrency_handle().unwrap().limit(), 2);
    /// ```
    pub fn concurrency_handle(&self) -> Option<ConcurrencyHandle> {
        self.concurrency.as_ref().map(ConcurrencyLayer::handle)
    }

    /// The cache layer, if any: e.g. to [`flush`](CacheLayer::flush) its write-behind queue
    /// before the process exits (the services built from this stack share it).
    pub fn cache_layer(&self) -> Option<&CacheLayer> {
        self.cache.as_ref()
    }

    /// Replaces (or with `None` removes) the cache layer.
    pub fn cache(mut self, layer: Option<CacheLayer>) -> Self {
        self.cache = layer;
        self
    }

    /// Replaces (or with `None` removes) the budget layer, placed between the cache and
    /// fallback.
    pub fn budget(mut self, layer: Option<crate::tenant::budget::BudgetLayer>) -> Self {
        self.budget = layer;
        self
    }

    /// The budget layer, if any (e.g. to read its spend store for a status page).
    pub fn budget_layer(&self) -> Option<&crate::tenant::budget::BudgetLayer> {
        self.budget.as_ref()
    }

    /// Replaces (or removes) the fallback layer. Its catalogue is the stack's; its board too
    /// unless it was given one ([which board](self#which-board-a-layer-uses)).
    pub fn fallback(mut self, layer: Option<FallbackLayer>) -> Self {
        self.fallback = layer;
        self
    }

    /// Replaces (or removes) the retry layer.
    pub fn retry(mut self, layer: Option<RetryLayer>) -> Self {
        self.retry = layer;
        self
    }

    /// Adds (or with `None` removes) a key pool between retry and the rate limiter: each
    /// request goes out with the pooled key that has the most headroom. Its catalogue is
    /// the stack's, its board too unless it was given one. No pool by default: the caller's own `x-api-key` is used.
    pub fn key_pool(mut self, layer: Option<KeyPoolLayer>) -> Self {
        self.key_pool = layer;
        self
    }

    /// Replaces (or removes) the tenant limit, between retry and the key pool (or the rate
    /// limiter). Its catalogue is the stack's; its board is its own (its keys are tenants).
    pub fn tenant_limit(mut self, layer: Option<TenantLimitLayer>) -> Self {
        self.tenant_limit = layer;
        self
    }

    /// The tenant limit's board (per tenant and group: its buckets and queue), for a status
    /// page.
    pub fn tenant_limit_board(&self) -> Option<&QuotaBoard> {
        self.tenant_limit
            .as_ref()
            .map(TenantLimitLayer::quota_board)
    }

    /// Replaces (or removes) the rate-limit layer. Its catalogue is the stack's; its board too
    /// unless it was given one ([which board](self#which-board-a-layer-uses)).
    pub fn rate_limit(mut self, layer: Option<RateLimitLayer>) -> Self {
        self.rate_limit = layer;
        self
    }

    /// Replaces (or removes) the concurrency layer.
    pub fn concurrency(mut self, layer: Option<ConcurrencyLayer>) -> Self {
        self.concurrency = layer;
        self
    }

    /// Wraps `inner` in every configured layer and boxes the result.
    pub fn service<S, B>(&self, inner: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // With a metrics layer (outermost; it reads the request's key, checked against its
        // headers, before any other layer) the fallback and rate limit layers take the key id
        // from the memo it left: below it only the stack's own layers run, and the one that
        // changes the key (the key pool) remembers the key it puts on.
        #[cfg(feature = "metrics")]
        let metrics = self.metrics_layer();
        #[cfg(feature = "metrics")]
        let key_checked = metrics.is_some();
        #[cfg(not(feature = "metrics"))]
        let key_checked = false;
        // Concrete types, boxed twice: under retry (see below) and at the end. A layer that is
        // usually there and may be switched off is an `Optional`, which passes the inner
        // service through when it is absent (no box, no extra call) and its answer's body in
        // the layer's pass-through body (`Absent::pass`). The layers that are usually absent
        // (pacing, the key pool, the budget, the cache) and the outermost one (metrics) are
        // chosen here instead, each configuration its own type: absent, such a layer is not
        // in the stack at all, so the layers above it neither carry its future's room (the
        // cache's 184 bytes, the budget's 88) nor move it as their own futures are built, and
        // its pass-through body does not wrap (and move) every answer.
        let svc = Optional(self.concurrency.clone()).layer(inner);
        let svc = Optional(self.rate_limit.as_ref().map(|layer| {
            let layer = own_or_shared!(layer.clone().catalog(self.catalog.clone()), self.board);
            match key_checked {
                true => layer.key_checked_above(),
                false => layer,
            }
        }))
        .layer(svc);
        let svc = self.paced(svc);
        let svc = Optional(
            self.retry
                .as_ref()
                .map(|layer| layer.clone().catalog(self.catalog.clone())),
        )
        .layer(svc);
        let fallback = self.fallback.as_ref().map(|layer| {
            let layer = own_or_shared!(layer.clone().catalog(self.catalog.clone()), self.board);
            let layer = match &self.key_pool {
                Some(pool) => layer.key_pool(pool.handle()),
                None => layer,
            };
            let layer = match key_checked {
                true => layer.key_checked_above(),
                false => layer,
            };
            // Retry sits directly below fallback: it resends from fallback's copy of the
            // request instead of keeping one of its own.
            match &self.retry {
                Some(_) => layer.resend_below(),
                None => layer,
            }
        });
        let handle = fallback.as_ref().map(FallbackLayer::handle);
        let svc = Optional(fallback).layer(svc);
        // The cache serves another model's answer only while fallback would choose it.
        let cache = self.cache.as_ref().map(|layer| match handle {
            Some(handle) => layer.clone().fallback(handle),
            None => layer.clone(),
        });
        let top = Top {
            cache,
            #[cfg(feature = "metrics")]
            metrics,
        };
        match &self.budget {
            Some(budget) => top.service(budget.layer(svc)),
            None => top.service(svc),
        }
    }

    /// The pacing layer (when there is one) over `svc`, then the key pool's and the tenant
    /// limit's, boxed: the service retry calls.
    fn paced<S, B>(&self, svc: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        #[cfg(feature = "metrics")]
        if let Some(layer) = &self.pacing {
            let layer = own_or_shared!(layer.clone().catalog(self.catalog.clone()), self.board);
            return self.pooled(layer.layer(svc));
        }
        self.pooled(svc)
    }

    /// The key pool (when there is one) over `svc`, then the tenant limit, boxed.
    fn pooled<S, B>(&self, svc: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match &self.key_pool {
            Some(layer) => {
                let layer = own_or_shared!(layer.clone().catalog(self.catalog.clone()), self.board);
                self.tenant_limited(layer.layer(svc))
            }
            None => self.tenant_limited(svc),
        }
    }

    /// The tenant limit over `svc`, boxed.
    fn tenant_limited<S, B>(&self, svc: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = Optional(
            self.tenant_limit
                .as_ref()
                .map(|layer| layer.clone().catalog(self.catalog.clone())),
        )
        .layer(svc);
        // Retry keeps the service below, the attempt in flight and the answer it reads ahead
        // inside one future, moved into its box once per request: with the layers below inline
        // (their futures and their response bodies), that copy was several KB (callgrind:
        // 12–14k instructions of memcpy per request, more than the boxes save). One box here
        // (service, future and body, as `boxed` does) keeps what retry and the layers above it
        // hold small. (Measured again once retry's first attempt was a small hand-written
        // future instead of the loop: without this box, +0.9k instructions per request.)
        boxed(svc)
    }
}

/// The stack's outermost layers, over the budget (or fallback, or retry, or the box below):
/// the cache and metrics when there are, then the top box.
struct Top {
    cache: Option<CacheLayer>,
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::MetricsLayer>,
}

impl Top {
    /// The cache (when there is one) over `svc`, then the outermost layer, boxed.
    fn service<S, B>(self, svc: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match &self.cache {
            Some(cache) => self.outermost(cache.layer(svc)),
            None => self.outermost(svc),
        }
    }

    /// The metrics layer over `svc`, which opens the request's `claude_request` span (with its
    /// labels); without one, [`Traced`] opens it.
    fn outermost<S, B>(&self, svc: S) -> ClaudeService
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        #[cfg(feature = "metrics")]
        if let Some(metrics) = &self.metrics {
            return boxed(metrics.layer(svc));
        }
        boxed(Traced { inner: svc })
    }
}

/// The outermost wrapper of a [`ClaudeStack`] service without a metrics layer: one `tracing`
/// span per request (`claude_request`, at debug level, with the method and path: never a
/// header or the body), entered while the layers take the request and around every poll of
/// its future, so that every layer's events carry it. Without a subscriber that wants it the
/// span is disabled and costs a level check. A stack with a metrics layer (which opens its own
/// `claude_request` span, with the request's labels) has no `Traced`: one span per request
/// either way.
#[derive(Clone)]
struct Traced<S> {
    inner: S,
}

impl<S> Service<Request<RequestBody>> for Traced<S>
where
    S: Service<Request<RequestBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        use tracing::Instrument;
        let span = tracing::debug_span!(
            "claude_request",
            method = %req.method(),
            path = req.uri().path()
        );
        let fut = span.in_scope(|| self.inner.call(req));
        fut.instrument(span)
    }
}

/// A layer of the stack that is usually there and may be absent (crate-private:
/// [`ClaudeStack::service`] composes concrete types and boxes twice). Absent, the inner service
/// is used as it is and its answer's body is wrapped in the layer's own body in pass-through
/// mode ([`Absent::pass`]); present, the layer's answer is returned untouched. So the response
/// type is the layer's either way: no `Either` body around each layer, rebuilt into every
/// response (the head moved once more per layer) and polled through on every frame.
#[derive(Clone)]
struct Optional<L>(Option<L>);

/// A layer's response body made from the inner service's when the layer is absent.
trait Absent {
    /// The layer's response body over an inner body `B`.
    type Body<B>;

    /// `body` as the layer's body in pass-through mode: every frame, the end and the size
    /// hint as they are.
    fn pass<B>(body: B) -> Self::Body<B>;
}

impl Absent for ConcurrencyLayer {
    type Body<B> = crate::concurrency::ConcurrencyBody<B>;

    fn pass<B>(body: B) -> Self::Body<B> {
        crate::concurrency::ConcurrencyBody::new(body, None)
    }
}

impl Absent for RateLimitLayer {
    type Body<B> = crate::rate_limit::RateLimitBody<B>;

    fn pass<B>(body: B) -> Self::Body<B> {
        crate::rate_limit::RateLimitBody::passthrough(body)
    }
}

impl Absent for TenantLimitLayer {
    type Body<B> = crate::rate_limit::RateLimitBody<B>;

    fn pass<B>(body: B) -> Self::Body<B> {
        crate::rate_limit::RateLimitBody::passthrough(body)
    }
}

impl Absent for RetryLayer {
    type Body<B> = crate::retry::RetryBody<B>;

    fn pass<B>(body: B) -> Self::Body<B> {
        crate::retry::RetryBody::new(body)
    }
}

impl Absent for FallbackLayer {
    type Body<B> = crate::fallback::FallbackBody<B>;

    fn pass<B>(body: B) -> Self::Body<B> {
        crate::body::Replay::new(body)
    }
}

impl<L: Layer<S> + Absent, S> Layer<S> for Optional<L> {
    type Service = OptionalService<L, L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.0 {
            Some(layer) => OptionalService::On(layer.layer(inner)),
            None => OptionalService::Off(inner, PhantomData),
        }
    }
}

/// The service of an [`Optional`] layer `L`.
enum OptionalService<L, A, B> {
    On(A),
    Off(B, PhantomData<fn() -> L>),
}

impl<L, A: Clone, B: Clone> Clone for OptionalService<L, A, B> {
    fn clone(&self) -> Self {
        match self {
            Self::On(a) => Self::On(a.clone()),
            Self::Off(b, _) => Self::Off(b.clone(), PhantomData),
        }
    }
}

impl<L, A, B, R, BB> Service<R> for OptionalService<L, A, B>
where
    L: Absent,
    A: Service<R, Response = Response<L::Body<BB>>, Error = BoxError>,
    B: Service<R, Response = Response<BB>>,
    B::Error: Into<BoxError>,
{
    type Response = Response<L::Body<BB>>;
    type Error = BoxError;
    type Future = OptionalFuture<L, A::Future, B::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::On(a) => a.poll_ready(cx),
            Self::Off(b, _) => b.poll_ready(cx).map_err(Into::into),
        }
    }

    // Inlined into the layer above: a call left out of line takes the request (264 bytes)
    // through a copy of its own, and its future back through another.
    #[inline(always)]
    fn call(&mut self, req: R) -> Self::Future {
        match self {
            Self::On(a) => OptionalFuture::On { fut: a.call(req) },
            Self::Off(b, _) => OptionalFuture::Off {
                fut: b.call(req),
                layer: PhantomData,
            },
        }
    }
}

/// The response future of an [`OptionalService`].
#[pin_project::pin_project(project = OptionalProj)]
enum OptionalFuture<L, FA, FB> {
    On {
        #[pin]
        fut: FA,
    },
    Off {
        #[pin]
        fut: FB,
        layer: PhantomData<fn() -> L>,
    },
}

impl<L, FA, FB, BB, EB> Future for OptionalFuture<L, FA, FB>
where
    L: Absent,
    FA: Future<Output = Result<Response<L::Body<BB>>, BoxError>>,
    FB: Future<Output = Result<Response<BB>, EB>>,
    EB: Into<BoxError>,
{
    type Output = Result<Response<L::Body<BB>>, BoxError>;

    // Inlined into the layer above, as `call`: the answer is written once, where the caller
    // wants it, not returned through a copy per level.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            // The layer's answer as it is (its error type is the stack's: no conversion, so
            // no move of the answer).
            OptionalProj::On { fut } => fut.poll(cx),
            OptionalProj::Off { fut, .. } => Poll::Ready(
                ready!(fut.poll(cx))
                    .map(|r| r.map(L::pass))
                    .map_err(Into::into),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Collects span names and event messages (a minimal subscriber: no extra dependency).
    #[derive(Clone, Default)]
    struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl tracing::Subscriber for Collect {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            self.0
                .lock()
                .unwrap()
                .push(format!("span {}", span.metadata().name()));
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    use std::fmt::Write;
                    let _ = write!(self.0, " {}={v:?}", f.name());
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// The decisions of one request are traced under one span: the model fallback chose and
    /// why, the rate limiter's admission; no key in clear.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn one_span_per_request_and_its_decisions() {
        let collect = Collect::default();
        let _guard = tracing::subscriber::set_default(collect.clone());
        let upstream = crate::test_upstream::message_upstream();
        let req = Request::post("/v1/messages")
            .header("x-api-key", "sk-ant-secret-key")
            .body(RequestBody::from(
                r#"{"model":"claude-opus-4-7","max_tokens":8,"messages":[]}"#,
            ))
            .unwrap();
        let stack = ClaudeStack::new().cache(None);
        stack.service(upstream).oneshot(req).await.unwrap();
        let lines = collect.0.lock().unwrap().clone();
        let text = lines.join("\n");
        assert_eq!(
            lines.iter().filter(|l| *l == "span claude_request").count(),
            1,
            "{text}"
        );
        assert!(text.contains("fallback: model chosen"), "{text}");
        assert!(text.contains("requested=claude-opus-4-7"), "{text}");
        assert!(text.contains("rate limit: admitted at once"), "{text}");
        assert!(!text.contains("sk-ant-secret-key"), "{text}");
    }

    /// Every configuration of the layers chosen by type (pacing, the key pool, the budget, the
    /// cache, metrics) answers, with each present layer in the stack and an absent one not:
    /// the key pool's key reaches the upstream only with a key pool, the cache's header is
    /// there only with a cache, and a request has one `claude_request` span whether the
    /// metrics layer or the stack opens it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn every_configuration_of_the_layers_chosen_by_type_answers() {
        use http_body_util::BodyExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let upstream = {
            let seen = seen.clone();
            tower::service_fn(move |req: Request<RequestBody>| {
                let key = req.headers().get("x-api-key").cloned();
                seen.lock().unwrap().push(key);
                crate::test_upstream::message_upstream().call(req)
            })
        };
        let combinations: u32 = if cfg!(feature = "metrics") { 32 } else { 8 };
        for bits in 0..combinations {
            let (key_pool, budget, cache) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let (metrics, pacing) = (bits & 8 != 0, bits & 16 != 0);
            let config = StackConfig {
                cache: match cache {
                    true => CacheConfig::Memory { max_bytes: 1 << 20 },
                    false => CacheConfig::Off,
                },
                cache_mode: CacheMode::All,
                budget:
                    budget.then(|| {
                        crate::tenant::budget::BudgetLayer::new(
                            crate::tenant::spend::MemorySpend::new(),
                        )
                    }),
                metrics,
                pacing: pacing.then(PacingConfig::default),
                ..StackConfig::default()
            };
            let mut stack = ClaudeStack::from_config(&config).unwrap();
            if key_pool {
                stack = stack.key_pool(Some(KeyPoolLayer::new(["sk-ant-pool-key"]).unwrap()));
            }
            let collect = Collect::default();
            let _guard = tracing::subscriber::set_default(collect.clone());
            let req = Request::post("/v1/messages")
                .header("x-api-key", "sk-ant-caller-key")
                .body(RequestBody::from(
                    r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
                ))
                .unwrap();
            let resp = stack.service(upstream.clone()).oneshot(req).await.unwrap();
            let what = format!(
                "key pool {key_pool}, budget {budget}, cache {cache}, metrics {metrics}, pacing {pacing}"
            );
            assert_eq!(resp.status(), 200, "{what}");
            assert_eq!(
                resp.headers().contains_key("x-tower-claude-cache"),
                cache,
                "{what}"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                &body[..],
                br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#,
                "{what}"
            );
            let key = seen.lock().unwrap().pop().flatten().unwrap();
            let expected = match key_pool {
                true => "sk-ant-pool-key",
                false => "sk-ant-caller-key",
            };
            assert_eq!(key, expected, "{what}");
            let spans = collect.0.lock().unwrap();
            assert_eq!(
                spans.iter().filter(|l| *l == "span claude_request").count(),
                1,
                "{what}: {spans:?}"
            );
        }
    }

    /// The board's view after a burst is the rate limiter's, with or without fallback above
    /// it. Fallback used to feed each answer's headers into the shared board a second time,
    /// without the grant they answer: that observation ignored what was given back since the
    /// answer was counted upstream (the unused part of each `max_tokens` reservation) and
    /// lowered the output-token bucket to the server's rounded, older view. The board then
    /// looked exhausted everywhere (in the `codegen_batch` demo every group's output bucket
    /// fell to 0, fallback found no candidate with headroom and kept Opus requests on Opus,
    /// queued: 85.0 s instead of 38.8 s).
    #[cfg(feature = "testing")]
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn fallback_does_not_undo_the_rate_limiters_view() {
        use crate::anthropic::KeyId;
        use crate::anthropic::RateLimitGroup;
        use crate::quota::Limits;
        use crate::testing::{MockClaude, MockLimits};
        use http_body_util::BodyExt;

        async fn output_level(fallback: bool) -> u64 {
            let mock = MockClaude::builder()
                .limits(
                    "claude-haiku-4-5",
                    MockLimits {
                        rpm: 100,
                        itpm: 100_000,
                        otpm: 8_000,
                    },
                )
                .latency(Duration::from_millis(600), Duration::ZERO)
                .output_tokens(420)
                .build();
            let mut limits = BTreeMap::new();
            limits.insert(
                "claude-haiku-4-5".to_owned(),
                Limits {
                    rpm: 100,
                    itpm: 100_000,
                    otpm: 8_000,
                },
            );
            let stack = ClaudeStack::from_config(&StackConfig {
                limits,
                fallback,
                retry: false,
                cache: CacheConfig::Off,
                ..StackConfig::default()
            })
            .unwrap();
            let svc = stack.service(mock);
            // Haiku is the end of the chain: fallback keeps every request on it.
            let calls = (0..6).map(|i| {
                let req = Request::post("https://api.anthropic.com/v1/messages")
                    .header("x-api-key", "sk-ant-burst")
                    .header("anthropic-version", "2023-06-01")
                    .header("content-type", "application/json")
                    .body(RequestBody::from(format!(
                        r#"{{"model":"claude-haiku-4-5","max_tokens":1024,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
                    )))
                    .unwrap();
                let svc = svc.clone();
                async move {
                    let resp = svc.oneshot(req).await.unwrap();
                    let status = resp.status();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(status, 200, "{body:?}");
                }
            });
            futures_util::future::join_all(calls).await;
            stack
                .quota_board()
                .headroom(
                    &KeyId::from_api_key("sk-ant-burst"),
                    &RateLimitGroup::new("claude-haiku-4-5"),
                )
                .and_then(|h| h.output_tokens)
                .map(|b| b.remaining)
                .unwrap()
        }

        let alone = output_level(false).await;
        let under_fallback = output_level(true).await;
        assert_eq!(under_fallback, alone, "fallback changed the board's view");
    }

    /// A board given to a layer wins over the stack's; a layer without one gets the stack's.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_board_given_to_a_layer_is_kept() {
        let upstream = crate::test_upstream::message_upstream();
        let request = || {
            Request::post("/v1/messages")
                .header("x-api-key", "sk-ant-test")
                .body(RequestBody::from(
                    r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
                ))
                .unwrap()
        };
        let own = QuotaBoard::new();
        let stack = ClaudeStack::new()
            .fallback(None)
            .rate_limit(Some(RateLimitLayer::new().board(own.clone())));
        stack.service(upstream).oneshot(request()).await.unwrap();
        assert_eq!(own.statuses().len(), 1, "the layer's own board is used");
        assert!(stack.quota_board().statuses().is_empty());

        let stack = ClaudeStack::new()
            .fallback(None)
            .rate_limit(Some(RateLimitLayer::new()));
        stack.service(upstream).oneshot(request()).await.unwrap();
        assert_eq!(stack.quota_board().statuses().len(), 1, "the stack's board");
    }

    #[test]
    fn every_concurrency_mode_and_the_budget_are_reachable() {
        let adaptive = StackConfig {
            adaptive_concurrency: Some(Aimd {
                initial: 5,
                ..Aimd::default()
            }),
            max_in_flight: Some(100),
            retry_budget: Some(RetryBudget::default()),
            ..StackConfig::default()
        };
        let stack = ClaudeStack::from_config(&adaptive).unwrap();
        assert_eq!(stack.concurrency_handle().unwrap().limit(), 5);
        let ramped = StackConfig {
            concurrency_ramp_up: Some(RampUp {
                initial: 3,
                step: 1,
                interval: Duration::from_secs(1),
            }),
            ..adaptive
        };
        let stack = ClaudeStack::from_config(&ramped).unwrap();
        assert_eq!(stack.concurrency_handle().unwrap().limit(), 3);
        let no_cap = StackConfig {
            concurrency_ramp_up: ramped.concurrency_ramp_up,
            ..StackConfig::default()
        };
        assert!(ClaudeStack::from_config(&no_cap).is_err());
        assert!(ClaudeStack::new().concurrency_handle().is_none());
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn pacing_brings_a_metrics_layer_to_feed_its_forecast() {
        let config = StackConfig {
            metrics: false,
            pacing: Some(PacingConfig::default()),
            ..StackConfig::default()
        };
        let stack = ClaudeStack::from_config(&config).unwrap();
        assert!(stack.is_paced());
        assert!(stack.metrics_layer().is_some());
        let off = StackConfig {
            metrics: false,
            ..StackConfig::default()
        };
        let stack = ClaudeStack::from_config(&off).unwrap();
        assert!(!stack.is_paced() && stack.metrics_layer().is_none());
    }
}
