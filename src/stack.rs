//! [`ClaudeStack`]: every layer of the crate, stacked in the recommended order around one
//! inner service, sharing one [`QuotaBoard`].
//!
//! ```text
//! caller
//!   MetricsLayer      what the caller sees: latency, status, tokens, retries, cache, fallback
//!   CacheLayer        identical request (same tenant) -> stored response; twins coalesce
//!   FallbackLayer     choose the model by remaining quota; fail over on exhaustion
//!   RetryLayer        429 / 529 / 5xx / connect errors; retry-after; spread; deadline
//!   KeyPoolLayer      (optional) the API key with the most headroom; cool down keys on 429
//!   RateLimitLayer    token buckets: requests, input and output tokens per (key, group)
//!   ConcurrencyLayer  cap on in-flight requests, held until the response body ends
//! inner service       HttpClient to api.anthropic.com, MockClaude, or anything
//! ```
//!
//! Retry sits outside the limiter so that every attempt pays for its tokens again; fallback
//! sits outside retry so that a model whose quota is gone is abandoned at once instead of
//! retried into; the cache is outermost so that a hit costs no quota at all. See
//! `docs/architecture.md` for what each layer reads and writes.
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
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::BoxError;
use crate::anthropic::{ModelCatalog, RateLimitGroup};
use crate::body::RequestBody;
use crate::cache::{CacheLayer, CacheMode};
use crate::concurrency::ConcurrencyLayer;
use crate::fallback::FallbackLayer;
use crate::key_pool::KeyPoolLayer;
use crate::quota::{Limits, OutputReservation, QuotaBoard};
use crate::rate_limit::RateLimitLayer;
use crate::retry::RetryLayer;

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
    BoxCloneSyncService::new(
        service
            .map_response(|resp: Response<B>| resp.map(|b| b.map_err(Into::into).boxed_unsync()))
            .map_err(Into::into),
    )
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
    /// Model ids, groups and the fallback chain.
    pub catalog: ModelCatalog,
    /// Whether requests are measured (`MetricsLayer`, feature `metrics`). Default: on when
    /// the feature is enabled. The metrics go to whatever recorder the `metrics` facade has
    /// (none installed: they cost next to nothing).
    pub metrics: bool,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            rate_limit: true,
            limits: BTreeMap::new(),
            output_reservation: OutputReservation::default(),
            max_queue_wait: None,
            max_in_flight: None,
            retry: true,
            max_attempts: 8,
            max_retry_delay: Duration::from_secs(90),
            deadline: None,
            seed: None,
            fallback: true,
            fallback_floor: None,
            cache: CacheConfig::default(),
            cache_ttl: Duration::from_secs(4 * 3600),
            cache_mode: CacheMode::default(),
            catalog: ModelCatalog::default(),
            metrics: cfg!(feature = "metrics"),
        }
    }
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
    fallback: Option<FallbackLayer>,
    retry: Option<RetryLayer>,
    key_pool: Option<KeyPoolLayer>,
    rate_limit: Option<RateLimitLayer>,
    concurrency: Option<ConcurrencyLayer>,
}

impl std::fmt::Debug for ClaudeStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ClaudeStack");
        #[cfg(feature = "metrics")]
        d.field("metrics", &self.metrics.is_some());
        d.field("cache", &self.cache.is_some())
            .field("fallback", &self.fallback.is_some())
            .field("retry", &self.retry.is_some())
            .field("key_pool", &self.key_pool.is_some())
            .field("rate_limit", &self.rate_limit.is_some())
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

    /// A stack from plain configuration. Fails only when a disk cache cannot be opened.
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
        .map(|c| c.ttl(config.cache_ttl).mode(config.cache_mode));

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
            layer
        });

        let rate_limit = config.rate_limit.then(|| {
            let layer = RateLimitLayer::new().output_reservation(config.output_reservation);
            match config.max_queue_wait {
                Some(wait) => layer.max_wait(wait),
                None => layer,
            }
        });

        let concurrency = config.max_in_flight.map(ConcurrencyLayer::new);

        #[cfg(not(feature = "metrics"))]
        if config.metrics {
            return Err("metrics need the `metrics` feature".into());
        }

        Ok(Self {
            #[cfg(feature = "metrics")]
            metrics: config
                .metrics
                .then(|| crate::metrics::MetricsLayer::new().board(board.clone())),
            board,
            catalog,
            cache,
            fallback,
            retry,
            key_pool: None,
            rate_limit,
            concurrency,
        })
    }

    /// Shares `board` with every layer (e.g. one board for several stacks, or a Redis board).
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

    /// Replaces (or with `None` removes) the metrics layer. Its board and catalogue are the
    /// stack's.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, layer: Option<crate::metrics::MetricsLayer>) -> Self {
        self.metrics = layer;
        self
    }

    /// The metrics layer, if any (e.g. to call its `spawn_refresh`).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics_layer(&self) -> Option<crate::metrics::MetricsLayer> {
        self.metrics
            .clone()
            .map(|m| m.board(self.board.clone()).catalog(self.catalog.clone()))
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

    /// Replaces (or removes) the fallback layer. Its board and catalogue are the stack's.
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
    /// request goes out with the pooled key that has the most headroom. Its board and
    /// catalogue are the stack's. No pool by default: the caller's own `x-api-key` is used.
    pub fn key_pool(mut self, layer: Option<KeyPoolLayer>) -> Self {
        self.key_pool = layer;
        self
    }

    /// Replaces (or removes) the rate-limit layer. Its board and catalogue are the stack's.
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
        let mut svc = boxed(inner);
        if let Some(layer) = &self.concurrency {
            svc = boxed(layer.layer(svc));
        }
        if let Some(layer) = &self.rate_limit {
            let layer = layer
                .clone()
                .board(self.board.clone())
                .catalog(self.catalog.clone());
            svc = boxed(layer.layer(svc));
        }
        if let Some(layer) = &self.key_pool {
            let layer = layer
                .clone()
                .board(self.board.clone())
                .catalog(self.catalog.clone());
            svc = boxed(layer.layer(svc));
        }
        if let Some(layer) = &self.retry {
            svc = boxed(layer.clone().catalog(self.catalog.clone()).layer(svc));
        }
        let mut fallback = None;
        if let Some(layer) = &self.fallback {
            let mut layer = layer
                .clone()
                .board(self.board.clone())
                .catalog(self.catalog.clone());
            if let Some(pool) = &self.key_pool {
                layer = layer.key_pool(pool.handle());
            }
            fallback = Some(layer.handle());
            svc = boxed(layer.layer(svc));
        }
        if let Some(layer) = &self.cache {
            // The cache serves another model's answer only while fallback would choose it.
            let layer = match fallback {
                Some(handle) => layer.clone().fallback(handle),
                None => layer.clone(),
            };
            svc = boxed(layer.layer(svc));
        }
        #[cfg(feature = "metrics")]
        if let Some(layer) = self.metrics_layer() {
            svc = boxed(layer.layer(svc));
        }
        svc
    }
}
