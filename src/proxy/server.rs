//! The hyper server of `claude-proxy`: routing, authentication, key injection, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use std::sync::atomic::{AtomicU64, Ordering};

use super::config::{MockSettings, ProxyConfig, RetryStrategy, Secret, Upstream};
use super::error_response::error_response;
use crate::BoxError;
use crate::anthropic::KeyId;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::{BufferBodyError, RequestBody};
use crate::cache::{CacheStatus, Tenant};
use crate::key_pool::KeyPoolLayer;
use crate::quota::{Limits, QuotaBoard};
use crate::retry::Deadline;
use crate::stack::{CacheConfig, ClaudeStack, StackConfig};

/// The response body type of the proxy.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// The boxed service the proxy sends requests to.
pub(crate) type ProxyService =
    BoxCloneSyncService<Request<RequestBody>, Response<ProxyBody>, BoxError>;

/// A configured proxy, ready to serve.
pub struct Proxy {
    state: Arc<State>,
}

struct State {
    config: ProxyConfig,
    service: ProxyService,
    board: QuotaBoard,
    /// The upstream keys the proxy holds (none when clients' keys pass through).
    keys: Option<crate::key_pool::KeyPoolHandle>,
    started: std::time::Instant,
    counters: Counters,
    metrics: Option<crate::metrics::MetricsLayer>,
    /// The response cache, to flush its write-behind queue on shutdown.
    cache: Option<crate::cache::CacheLayer>,
}

/// What the status page reports besides the board.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_bypass: AtomicU64,
    errors: AtomicU64,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Builds the upstream service and the stack from `config`.
    pub fn new(config: ProxyConfig) -> Result<Self, BoxError> {
        if config.redis_url.is_some() {
            return Err("a Redis URL is configured: build the proxy with `Proxy::connect`".into());
        }
        let stack = ClaudeStack::from_config(&stack_config(&config))?;
        Self::assemble(config, stack)
    }

    /// Builds the proxy like [`Proxy::new`], and with a Redis URL in the configuration also
    /// connects the shared quota board and cache (a Redis that is down at start is not an
    /// error: the board limits locally with its share and reconnects in the background).
    pub async fn connect(config: ProxyConfig) -> Result<Self, BoxError> {
        let mut local = stack_config(&config);
        if config.redis_url.is_some() {
            // The cache lives in Redis: opening the disk cache first would only lock its
            // file (and stop a second node started in the same directory).
            local.cache = CacheConfig::Off;
        }
        let mut stack = ClaudeStack::from_config(&local)?;
        #[cfg(feature = "redis")]
        if let Some(url) = &config.redis_url {
            let mut board = QuotaBoard::builder();
            for (group, l) in &config.limits {
                board = board.limits(
                    crate::anthropic::RateLimitGroup::new(group),
                    Limits {
                        rpm: l.rpm,
                        itpm: l.itpm,
                        otpm: l.otpm,
                    },
                );
            }
            let options = crate::quota::RedisOptions::new().expected_nodes(config.expected_nodes);
            stack = stack.board(board.build_redis(url, options).await?);
            if config.cache {
                let store = crate::cache::RedisStore::connect(url).await?;
                stack = stack.cache(Some(
                    crate::cache::CacheLayer::new(store)
                        .ttl(config.cache_ttl)
                        .mode(config.cache_mode),
                ));
            }
        }
        #[cfg(not(feature = "redis"))]
        if config.redis_url.is_some() {
            return Err("REDIS_URL needs claude-proxy built with the `redis` feature".into());
        }
        Self::assemble(config, stack)
    }

    fn assemble(config: ProxyConfig, mut stack: ClaudeStack) -> Result<Self, BoxError> {
        let mut keys = None;
        if !config.api_keys.is_empty() {
            let pool = KeyPoolLayer::new(config.api_keys.iter().map(Secret::expose))?;
            keys = Some(pool.handle());
            stack = stack.key_pool(Some(pool));
        }
        if config.metrics {
            // Install the recorder before any request is measured.
            let _ = prometheus_handle();
            let mut alerts = crate::metrics::alerts::Alerts::builder()
                .threshold(config.alert_threshold)
                .on_alert(|alert| tracing::warn!(alert = %alert.text(), "quota alert"));
            if let Some(url) = &config.alert_webhook {
                alerts = alerts.webhook(crate::metrics::alerts::Webhook::new(url)?);
            }
            stack = stack.metrics(Some(
                crate::metrics::MetricsLayer::new().alerts(alerts.build()),
            ));
        }
        let metrics = stack.metrics_layer();
        let cache = stack.cache_layer().cloned();
        let board = stack.quota_board().clone();
        let service = match &config.upstream {
            Upstream::Url(uri) => stack.service(crate::client::HttpClient::new(uri.clone())),
            Upstream::Mock(m) => stack.service(simulator(m)),
        };
        Ok(Self {
            state: Arc::new(State {
                service,
                config,
                board,
                keys,
                started: std::time::Instant::now(),
                counters: Counters::default(),
                metrics,
                cache,
            }),
        })
    }

    /// The quota board shared by the proxy's layers (what `/v1/proxy/status` reports).
    pub fn quota_board(&self) -> &QuotaBoard {
        &self.state.board
    }

    /// The pool of upstream keys the proxy holds (`None` when clients' own keys pass
    /// through): which keys are in rotation, cooling down, refused in a group or removed.
    pub fn key_pool(&self) -> Option<&crate::key_pool::KeyPoolHandle> {
        self.state.keys.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.state.config
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting and
    /// lets in-flight requests finish (for at most the configured deadline).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        // Quota gauges and alerts move even while no response arrives.
        let refresh = self
            .state
            .metrics
            .as_ref()
            .map(|m| m.spawn_refresh(Duration::from_secs(5)));
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(conn) => conn,
                        Err(err) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(%err, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let svc = ConnService { state: self.state.clone() };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        if let Err(err) = conn.await {
                            tracing::debug!(%peer, error = %err, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        if let Some(refresh) = refresh {
            refresh.abort();
        }
        tracing::info!("shutting down: waiting for in-flight requests");
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(self.state.config.deadline) => {
                tracing::warn!("in-flight requests still running at the deadline; closing");
            }
        }
        // Answers already delivered are stored before the process exits (bounded in time).
        if let Some(cache) = &self.state.cache {
            if tokio::time::timeout(Duration::from_secs(10), cache.flush())
                .await
                .is_err()
            {
                tracing::warn!("cache writes still pending after 10 s; not all answers stored");
            }
        }
        Ok(())
    }
}

/// The per-connection hyper service. A named type (rather than `service_fn` over a closure)
/// keeps the future's type concrete, which hyper-util's auto builder needs to prove `Send`.
#[derive(Clone)]
struct ConnService {
    state: Arc<State>,
}

type HandleFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move { Ok(handle(state, req).await) })
    }
}

/// The stack configuration the proxy's settings describe.
fn stack_config(config: &ProxyConfig) -> StackConfig {
    let (retry, max_attempts, max_retry_delay) = match config.retry_strategy {
        RetryStrategy::None => (false, 1, Duration::ZERO),
        RetryStrategy::Sdk => (true, config.max_retries + 1, Duration::from_secs(60)),
        RetryStrategy::Patient => (true, config.max_retries + 1, Duration::from_secs(90)),
    };
    let cache = match (&config.cache, &config.cache_path) {
        (false, _) => CacheConfig::Off,
        (true, None) => CacheConfig::Memory {
            max_bytes: config.cache_max_bytes,
        },
        (true, Some(path)) => CacheConfig::Disk {
            path: path.clone(),
            max_bytes: config.cache_max_bytes,
        },
    };
    StackConfig {
        limits: config
            .limits
            .iter()
            .map(|(group, l)| {
                (
                    group.clone(),
                    Limits {
                        rpm: l.rpm,
                        itpm: l.itpm,
                        otpm: l.otpm,
                    },
                )
            })
            .collect(),
        max_in_flight: config.max_in_flight,
        retry,
        max_attempts: max_attempts.max(1),
        max_retry_delay,
        deadline: Some(config.deadline),
        fallback: config.fallback,
        fallback_floor: config.fallback_model.clone(),
        cache,
        cache_ttl: config.cache_ttl,
        cache_mode: config.cache_mode,
        metrics: config.metrics,
        ..StackConfig::default()
    }
}

/// The built-in simulator with the configured limits, faults and latency.
fn simulator(m: &MockSettings) -> crate::testing::MockClaude {
    crate::testing::MockClaude::builder()
        .default_limits(crate::testing::MockLimits {
            rpm: m.rpm,
            itpm: m.itpm,
            otpm: m.otpm,
        })
        .seed(m.seed)
        .overloaded_rate(m.overloaded_rate)
        .latency(
            Duration::from_millis(m.latency_ms),
            Duration::from_millis(m.per_token_ms),
        )
        .output_tokens(m.output_tokens)
        .build()
}

/// `GET /v1/proxy/status`: per key id and group, the limits, what is left, the queue; the
/// proxy's upstream keys (when it holds them) and the Redis backend (when configured); the
/// cache hit rate. Key ids only, never keys.
fn status_page(state: &State) -> Response<ProxyBody> {
    let bucket = |b: Option<crate::quota::BucketHeadroom>| match b {
        Some(b) => serde_json::json!({"limit": b.limit, "remaining": b.remaining,
            "fraction": (b.fraction * 1000.0).round() / 1000.0, "full_in_s": b.full_in.as_secs_f64()}),
        None => serde_json::Value::Null,
    };
    let quota: Vec<_> = state
        .board
        .statuses()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "key_id": s.key.as_str(),
                "group": s.group.as_str(),
                "limits_configured": s.configured,
                "requests": bucket(s.headroom.requests),
                "input_tokens": bucket(s.headroom.input_tokens),
                "output_tokens": bucket(s.headroom.output_tokens),
                "remaining_fraction": (s.headroom.fraction * 1000.0).round() / 1000.0,
                "queue_depth": s.queue_depth,
                "in_flight": s.in_flight,
            })
        })
        .collect();
    let groups = |list: Vec<(crate::anthropic::RateLimitGroup, Duration)>| {
        list.into_iter()
            .map(|(g, d)| serde_json::json!({"group": g.as_str(), "for_s": d.as_secs_f64()}))
            .collect::<Vec<_>>()
    };
    let keys: Option<Vec<_>> = state.keys.as_ref().map(|handle| {
        handle
            .statuses()
            .into_iter()
            .map(|k| {
                let (state, removed) = match k.state {
                    crate::key_pool::KeyState::Removed { reason, since } => (
                        "removed",
                        serde_json::json!({"reason": reason.to_string(), "since_s": since.as_secs()}),
                    ),
                    _ => ("active", serde_json::Value::Null),
                };
                serde_json::json!({
                    "key_id": k.key.as_str(),
                    "state": state,
                    "removed": removed,
                    "cooldowns": groups(k.cooldowns),
                    "forbidden": groups(k.forbidden),
                    "in_flight": k.in_flight,
                    "requests": k.requests,
                    "rate_limited": k.rate_limited,
                })
            })
            .collect()
    });
    #[cfg(feature = "redis")]
    let redis = state.board.redis_status().map(|r| {
        serde_json::json!({
            "degraded": r.degraded,
            "outages": r.outages,
            "recoveries": r.recoveries,
            "shared_grants": r.shared_grants,
            "fallback_acquires": r.fallback_acquires,
            "errors": r.errors,
            "local_share": r.local_share,
        })
    });
    #[cfg(not(feature = "redis"))]
    let redis: Option<serde_json::Value> = None;
    let c = &state.counters;
    let hits = c.cache_hits.load(Ordering::Relaxed);
    let misses = c.cache_misses.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "upstream": match &state.config.upstream {
            Upstream::Url(uri) => uri.to_string(),
            Upstream::Mock(_) => "mock".to_owned(),
        },
        "requests": c.requests.load(Ordering::Relaxed),
        "errors": c.errors.load(Ordering::Relaxed),
        "cache": {
            "enabled": state.config.cache,
            "mode": state.config.cache_mode.as_str(),
            "hits": hits,
            "misses": misses,
            "bypass": c.cache_bypass.load(Ordering::Relaxed),
            "hit_rate": if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
        },
        "quota": quota,
        "keys": keys,
        "redis": redis,
    });
    json_response(StatusCode::OK, body.to_string())
}

/// The process-wide Prometheus recorder, installed by the first proxy that asks for it (the
/// `metrics` facade has one global recorder). `None` when another recorder was installed first.
fn prometheus_handle() -> Option<&'static crate::metrics::prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<crate::metrics::prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| match crate::metrics::prometheus::install() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!(%err, "cannot install the Prometheus recorder; /metrics is off");
                None
            }
        })
        .as_ref()
}

/// `GET /metrics`: every metric of `docs/metrics.md` in the Prometheus text format.
fn metrics_page(state: &State) -> Response<ProxyBody> {
    let handle = match (&state.metrics, state.config.metrics) {
        (Some(_), true) => prometheus_handle(),
        _ => None,
    };
    let Some(handle) = handle else {
        return api_error(
            ApiErrorKind::NotFound,
            "metrics are off (CLAUDE_PROXY_METRICS=false)",
        );
    };
    if let Some(m) = &state.metrics {
        m.refresh();
    }
    let mut resp = Response::new(
        Full::new(Bytes::from(crate::metrics::prometheus::render(handle)))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::prometheus::CONTENT_TYPE),
    );
    resp
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn api_error(kind: ApiErrorKind, message: &str) -> Response<ProxyBody> {
    let err = ApiError::new(kind, message);
    json_response(err.status(), err.to_envelope())
}

/// The token a client presented: `x-api-key`, else `Authorization: Bearer`.
fn presented_token(req: &Request<Incoming>) -> Option<&str> {
    if let Some(v) = req.headers().get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &Secret) -> bool {
    let b = b.expose().as_bytes();
    let a = a.as_bytes();
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(state: Arc<State>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => {
            return json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"));
        }
        (&Method::GET, "/metrics") => return metrics_page(&state),
        _ if path.starts_with("/v1/") || path == "/v1" => {}
        _ => return api_error(ApiErrorKind::NotFound, &format!("no route for {path}")),
    }

    let config = &state.config;
    if !config.client_tokens.is_empty() {
        let ok = presented_token(&req)
            .is_some_and(|t| config.client_tokens.iter().any(|s| same_secret(t, s)));
        if !ok {
            return api_error(
                ApiErrorKind::Authentication,
                "invalid proxy token: send one of the proxy's client tokens as x-api-key",
            );
        }
    }
    // The status page names keys and tenants' usage: behind the client tokens like the API.
    if req.method() == Method::GET && path == "/v1/proxy/status" {
        return status_page(&state);
    }
    if !config.api_keys.is_empty() {
        // The proxy holds the upstream keys (the key pool picks one per request): the client's
        // credential never goes upstream. It still names the cache tenant, so that clients
        // with different proxy tokens never share cached answers.
        let tenant = presented_token(&req)
            .filter(|t| !t.is_empty())
            .map(|t| KeyId::from_api_key(t).as_str().to_owned())
            .unwrap_or_else(|| "proxy".to_owned());
        req.extensions_mut().insert(Tenant::new(tenant));
        req.headers_mut().remove(header::AUTHORIZATION);
        req.headers_mut().remove("x-api-key");
    }

    // Buffer the body here rather than through `BufferBody`: the same work, but with concrete
    // types, which keeps this future provably `Send` for hyper (a rustc limitation with
    // higher-ranked `Into<BoxError>` bounds in async blocks).
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, config.body_limit).collect().await {
        Ok(collected) => RequestBody::from(collected.to_bytes()),
        Err(err) => {
            return error_response(
                &BufferBodyError::from_body_error(err, config.body_limit).into(),
            );
        }
    };
    let req = Request::from_parts(parts, body);
    // The proxy's deadline bounds every wait below (quota queue, retries), unless the
    // request already carries an earlier one.
    let mut req = req;
    if req.extensions().get::<Deadline>().is_none() {
        req.extensions_mut()
            .insert(Deadline::after(config.deadline));
    }
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    match state.service.clone().oneshot(req).await {
        Ok(mut resp) => {
            for name in crate::client::HOP_BY_HOP.iter() {
                resp.headers_mut().remove(name);
            }
            let counter = match resp.extensions().get::<CacheStatus>() {
                Some(CacheStatus::Hit) => Some(&state.counters.cache_hits),
                Some(CacheStatus::Miss) => Some(&state.counters.cache_misses),
                Some(CacheStatus::Bypass) => Some(&state.counters.cache_bypass),
                _ => None,
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            resp
        }
        Err(err) => {
            state.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "request failed in the proxy");
            error_response(&err)
        }
    }
}
