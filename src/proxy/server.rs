//! The hyper server of `claude-proxy`: routing, authentication, key injection, graceful shutdown.
//!
//! The HTTP stack in front of the `ClaudeStack` is the proxy's front and tower-http (`edge.rs`:
//! sensitive headers, request ids, the request span, panics, the body limit); connections are watched by
//! `conn.rs` (timeouts, the cap), which tower-http cannot see.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;

use std::sync::atomic::{AtomicU64, Ordering};

use super::config::{MockSettings, ProxyConfig, RetryStrategy, Secret, Upstream};
use super::conn::{self, ConnLimits, ConnService, Registry, Watched};
use super::edge::{self, EdgeBody};
use super::error_response::error_response;
use super::front::ProxyRequestId;
use super::tenants::{TenantTable, TenantsReload};
use crate::BoxError;
use crate::anthropic::KeyId;
use crate::anthropic::parsed_names::X_API_KEY;
use crate::anthropic::{ApiError, ApiErrorKind};
use crate::body::{BufferBodyError, RequestBody};
use crate::cache::{CacheStatus, Tenant as CacheTenant};
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
    /// The concurrency cap (issue 16: its live limit is on the status page).
    concurrency: Option<crate::concurrency::ConcurrencyHandle>,
    /// Whether the stack paces admissions.
    paced: bool,
    /// The response cache, to flush its write-behind queue on shutdown.
    cache: Option<crate::cache::CacheLayer>,
    /// The tenants (with a tenants file): swapped whole by a reload, while requests in flight
    /// keep the `Tenant` they were admitted with.
    tenants: Option<RwLock<Arc<TenantTable>>>,
    /// The budget layer (with a tenants file), whose spend store the status page reads.
    budget: Option<crate::tenant::budget::BudgetLayer>,
}

impl State {
    /// The tenant table in force now.
    fn tenant_table(&self) -> Option<Arc<TenantTable>> {
        self.tenants
            .as_ref()
            .map(|t| t.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
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
        let spend = local_spend(&config)?;
        Self::assemble(config, stack, None, spend)
    }

    /// Builds the proxy like [`Proxy::new`], with `upstream` as the innermost service instead
    /// of the configured upstream: an in-process backend, a test double, a client of your own.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_claude::{BoxError, body::RequestBody};
    /// use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
    ///
    /// let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
    ///     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
    /// });
    /// let config = ProxyConfig::resolve(Cli::default(), &Default::default()).unwrap();
    /// let proxy = Proxy::with_upstream(config, upstream).unwrap();
    /// # drop(proxy);
    /// ```
    pub fn with_upstream<S, B>(config: ProxyConfig, upstream: S) -> Result<Self, BoxError>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if config.redis_url.is_some() {
            return Err("a Redis URL is configured: build the proxy with `Proxy::connect`".into());
        }
        let stack = ClaudeStack::from_config(&stack_config(&config))?;
        let spend = local_spend(&config)?;
        Self::assemble(config, stack, Some(crate::stack::boxed(upstream)), spend)
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
        let mut spend = None;
        #[cfg(feature = "redis")]
        if let Some(url) = &config.redis_url {
            if config.tenants.is_some() {
                // Several nodes share each tenant's spend (INCRBY per tenant and period) and
                // each tenant's own limits (its buckets on a Redis board of their own).
                spend = Some(
                    Arc::new(crate::tenant::spend::RedisSpend::connect(url).await?)
                        as Arc<dyn crate::tenant::spend::SpendStore>,
                );
                let options = crate::quota::RedisOptions::new()
                    .key_prefix("tower-claude:tenant-quota:")
                    .expected_nodes(config.expected_nodes)
                    .fail_closed(config.redis_fail_closed)
                    .response_timeout(config.redis_quota_timeout);
                let board = QuotaBoard::builder().build_redis(url, options).await?;
                stack = stack.tenant_limit(Some(
                    crate::tenant::limit::TenantLimitLayer::new()
                        .board(board)
                        .output_reservation(local.output_reservation),
                ));
            }
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
            let options = crate::quota::RedisOptions::new()
                .expected_nodes(config.expected_nodes)
                .fail_closed(config.redis_fail_closed)
                .response_timeout(config.redis_quota_timeout);
            stack = stack.board(board.build_redis(url, options).await?);
            if config.cache {
                let store = crate::cache::RedisStore::connect(url).await?;
                let layer = crate::cache::CacheLayer::new(store)
                    .ttl(config.cache_ttl)
                    .mode(config.cache_mode);
                stack = stack.cache(Some(match &config.cache_secret {
                    Some(secret) => layer.secret(secret.clone()),
                    None => layer,
                }));
            }
        }
        #[cfg(not(feature = "redis"))]
        if config.redis_url.is_some() {
            return Err("REDIS_URL needs claude-proxy built with the `redis` feature".into());
        }
        if spend.is_none() {
            spend = local_spend(&config)?;
        }
        Self::assemble(config, stack, None, spend)
    }

    fn assemble(
        config: ProxyConfig,
        mut stack: ClaudeStack,
        upstream: Option<crate::stack::ClaudeService>,
        spend: Option<Arc<dyn crate::tenant::spend::SpendStore>>,
    ) -> Result<Self, BoxError> {
        let mut keys = None;
        if !config.api_keys.is_empty() {
            let pool = KeyPoolLayer::new(config.api_keys.iter().map(Secret::expose))?;
            keys = Some(pool.handle());
            stack = stack.key_pool(Some(pool));
        }
        let mut budget_alerts = None;
        if config.metrics {
            // Install the recorder before any request is measured.
            let _ = prometheus_handle();
            let mut alerts = crate::metrics::alerts::Alerts::builder()
                .threshold(config.alert_threshold)
                .on_alert(|alert| tracing::warn!(alert = %alert.text(), "quota alert"));
            if let Some(url) = &config.alert_webhook {
                alerts = alerts.webhook(crate::metrics::alerts::Webhook::new(url)?);
            }
            let alerts = alerts.build();
            stack = stack.metrics(Some(
                crate::metrics::MetricsLayer::new().alerts(alerts.clone()),
            ));
            budget_alerts = Some(alerts);
        }
        // With a tenants file: each tenant's dollars per day and month (a tenant without a
        // budget is metered, never refused), 80 % alerts through the quota alerts' path.
        if let Some(store) = spend {
            let mut layer =
                crate::tenant::budget::BudgetLayer::from_arc(store).prices(config.prices.clone());
            if let Some(alerts) = budget_alerts {
                layer = layer.alerts(alerts);
            }
            stack = stack.budget(Some(layer));
        }
        let budget = stack.budget_layer().cloned();
        let metrics = stack.metrics_layer();
        let cache = stack.cache_layer().cloned();
        let board = stack.quota_board().clone();
        let concurrency = stack.concurrency_handle();
        let paced = stack.is_paced();
        let tenants = config.tenants.clone().map(|t| RwLock::new(Arc::new(t)));
        let service = match (upstream, &config.upstream) {
            (Some(upstream), _) => stack.service(upstream),
            (None, Upstream::Url(uri)) => stack.service(
                crate::client::HttpClient::new(uri.clone())
                    .pool_idle_timeout(config.upstream_idle_timeout),
            ),
            (None, Upstream::Mock(m)) => stack.service(simulator(m)),
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
                concurrency,
                paced,
                cache,
                tenants,
                budget,
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

    /// Puts removed upstream keys back into rotation (after an operator raised a spend cap or
    /// fixed a key, say): re-reads the keys file, and restores every key it lists that the
    /// pool removed (401, 402, or by hand). Without a keys file, every configured key is
    /// restored. A key the file lists that the pool does not hold is counted and logged: the
    /// pool's set of keys is fixed at start, so adding one needs a restart. `claude-proxy`
    /// calls this on SIGHUP ([`reload_keys_on_sighup`](Self::reload_keys_on_sighup)).
    ///
    /// Fails only when the keys file cannot be read; the pool is then left as it was.
    pub fn reload_keys(&self) -> Result<KeysReload, BoxError> {
        reload_keys(&self.state)
    }

    /// Re-reads the tenants file (when one is configured) and the keys file, as one step:
    /// a tenants file that does not parse or validate, or a keys file that cannot be read, is
    /// refused with the field named and nothing changes. Otherwise the new tenant table
    /// replaces the old one at once (requests in flight keep the tenant they were admitted
    /// with; a tenant that keeps its name keeps its counters) and removed keys are restored
    /// as [`reload_keys`](Self::reload_keys) does. `claude-proxy` calls this on SIGHUP and on
    /// `POST /v1/proxy/reload` from an admin tenant.
    pub fn reload(&self) -> Result<Reload, BoxError> {
        reload(&self.state)
    }

    /// The tenant table in force (`None` without a tenants file).
    pub fn tenants(&self) -> Option<Arc<TenantTable>> {
        self.state.tenant_table()
    }

    /// Spawns a task that calls [`reload`](Self::reload) on every SIGHUP (Unix only; elsewhere
    /// nothing is spawned): one signal re-reads the keys file and the tenants file. A refused
    /// file is logged (`warn`) and the running configuration kept. The task ends with the
    /// runtime.
    pub fn reload_on_sighup(&self) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup())?;
            let state = self.state.clone();
            Ok(Some(tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: re-reading the keys file and the tenants file");
                    if let Err(err) = reload(&state) {
                        tracing::warn!(%err, "SIGHUP: reload refused; the running configuration is kept");
                    }
                }
            })))
        }
        #[cfg(not(unix))]
        Ok(None)
    }

    /// The same as [`reload_on_sighup`](Self::reload_on_sighup) (its name from before the
    /// tenants file: one SIGHUP re-reads both files).
    pub fn reload_keys_on_sighup(&self) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
        self.reload_on_sighup()
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting and
    /// lets in-flight requests finish (for at most the configured deadline).
    ///
    /// Each connection lives under the configured header-read and idle timeouts; at most
    /// `max_connections` are open (fewer when the file descriptor limit is lower): at the cap
    /// the oldest connection with no request in progress is closed to make room.
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
        let config = &self.state.config;
        let cap = conn::fitting_cap(config.max_connections);
        if cap < config.max_connections {
            tracing::info!(
                configured = config.max_connections,
                cap,
                "max_connections lowered to fit the file descriptor limit (raise `ulimit -n`)"
            );
        }
        let limits = ConnLimits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
        };
        let registry = Arc::new(Registry::new(cap));
        let slots = Arc::new(Semaphore::new(cap));
        let sweeper = {
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Registry::sweep_every(limits));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    registry.sweep(limits);
                }
            })
        };
        // The client's key goes upstream (no upstream keys of the proxy's, no tenants): its id
        // is remembered by the front's header walk for the layers' quota and metrics.
        let remember_keys = config.api_keys.is_empty() && self.state.tenants.is_none();
        let stack = edge::stack(
            config.body_limit,
            remember_keys,
            Handle::new(self.state.clone()),
        );
        // hyper's HTTP/1 header-read timeout stays off (no timer is set): it would also close
        // keep-alive connections after the header timeout; `conn::watch` does both jobs.
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let evicted = registry.evict_one();
                    tracing::debug!(cap, evicted, "at the connection cap");
                    tokio::select! {
                        permit = slots.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                        () = &mut shutdown => break,
                    }
                }
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        // Out of file descriptors and the like: make room, back off, keep serving.
                        tracing::warn!(%err, "accept failed");
                        registry.evict_one();
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let activity = registry.open();
            let svc = ConnService::new(stack.clone(), activity.clone());
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(err) = Watched::new(conn, activity).await {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
            });
        }
        drop(listener);
        if let Some(refresh) = refresh {
            refresh.abort();
        }
        tracing::info!("shutting down: waiting for in-flight requests");
        registry.close_all();
        let all = u32::try_from(cap).unwrap_or(u32::MAX);
        tokio::select! {
            _ = slots.acquire_many(all) => {}
            () = tokio::time::sleep(self.state.config.deadline) => {
                tracing::warn!("in-flight requests still running at the deadline; closing");
            }
        }
        sweeper.abort();
        // Answers already delivered are stored before the process exits (bounded in time).
        if let Some(cache) = &self.state.cache {
            if tokio::time::timeout(Duration::from_secs(10), cache.flush())
                .await
                .is_err()
            {
                tracing::warn!("cache writes still pending after 10 s; not all answers stored");
            }
        }
        // Settled costs are in the spend store before the process exits (a restart finds them).
        if let Some(budget) = &self.state.budget {
            if tokio::time::timeout(Duration::from_secs(10), budget.flush())
                .await
                .is_err()
            {
                tracing::warn!("spend store writes still pending after 10 s; not all costs stored");
            }
        }
        Ok(())
    }
}

/// What [`Proxy::reload_keys`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeysReload {
    /// The keys put back into rotation.
    pub restored: Vec<KeyId>,
    /// Keys listed that the pool does not hold (they need a restart).
    pub not_in_pool: usize,
}

/// What [`Proxy::reload`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reload {
    /// The keys file's part.
    pub keys: KeysReload,
    /// The tenants file's part (`None` without a tenants file).
    pub tenants: Option<TenantsReload>,
}

impl Reload {
    /// The JSON answer of `POST /v1/proxy/reload` (key ids and tenant names only).
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": {
                "restored": self.keys.restored.iter().map(KeyId::as_str).collect::<Vec<_>>(),
                "not_in_pool": self.keys.not_in_pool,
            },
            "tenants": self.tenants.as_ref().map(|t| serde_json::json!({
                "added": t.added,
                "removed": t.removed,
                "changed": t.changed,
                "unchanged": t.unchanged,
            })),
        })
    }
}

fn reload(state: &State) -> Result<Reload, BoxError> {
    // Both files are read and checked before anything changes.
    let table = match (&state.tenants, &state.config.tenants_file) {
        (Some(_), Some(path)) => Some(TenantTable::read(path)?),
        _ => None,
    };
    let keys = reload_keys(state)?;
    let tenants = match (table, &state.tenants) {
        (Some(table), Some(slot)) => {
            // Under the write lock, so that two reloads at once cannot lose counters.
            let mut current = slot.write().unwrap_or_else(PoisonError::into_inner);
            let (table, report) = table.carry_over(&current);
            *current = Arc::new(table);
            tracing::info!(
                added = ?report.added,
                removed = ?report.removed,
                changed = ?report.changed,
                unchanged = report.unchanged,
                "tenants reloaded"
            );
            Some(report)
        }
        _ => None,
    };
    Ok(Reload { keys, tenants })
}

fn reload_keys(state: &State) -> Result<KeysReload, BoxError> {
    let mut report = KeysReload::default();
    let Some(pool) = &state.keys else {
        return Ok(report);
    };
    let listed = match &state.config.keys_file {
        Some(path) => super::config::read_keys_file(path)?,
        None => state.config.api_keys.clone(),
    };
    for key in listed {
        let id = key.id();
        if pool.status(&id).is_none() {
            tracing::warn!(key = %id, "keys file lists a key the pool does not hold: restart to add it");
            report.not_in_pool += 1;
        } else if pool.restore(&id) {
            report.restored.push(id);
        }
    }
    tracing::info!(
        restored = report.restored.len(),
        not_in_pool = report.not_in_pool,
        "keys reloaded"
    );
    Ok(report)
}

/// The innermost service of the proxy's HTTP stack: routing, authentication, buffering, and
/// the call into the `ClaudeStack`. A named type keeps the future's type concrete, which
/// hyper-util's auto builder needs to prove `Send`.
///
/// Each clone has its own copy of the proxy's service ([`Serving`]): the edge stack is cloned
/// once per connection, so a connection calls its own copy for every request instead of
/// cloning the service for each one.
pub(crate) struct Handle {
    serving: Arc<Serving>,
}

/// What a connection's requests are served with: the proxy's state and the connection's own
/// copy of its service.
///
/// The handler calls the service after an `.await` (the body read) from a `'static` future,
/// which cannot borrow the connection's copy: it holds this `Arc` instead and takes the copy
/// for the call alone (`poll_ready`, then `call`, under the lock; no `.await` in between).
/// Cloning the service for every request (tower's `clone_box`: a box, every layer's state and
/// its `Arc`s, and their drop after the answer) and driving the clone with `Oneshot` (the
/// request carried in the handler's future until the first poll) cost more than the lock of
/// a mutex nobody else holds (one request at a time on an HTTP/1 connection; a copy in use by
/// another stream of an HTTP/2 connection is not waited for, a clone serves).
struct Serving {
    state: Arc<State>,
    service: std::sync::Mutex<ProxyService>,
}

impl Handle {
    fn new(state: Arc<State>) -> Self {
        Self {
            serving: Arc::new(Serving {
                service: std::sync::Mutex::new(state.service.clone()),
                state,
            }),
        }
    }
}

impl Clone for Handle {
    /// A handle with a copy of the service of its own (see [`Handle`]).
    fn clone(&self) -> Self {
        Self::new(self.serving.state.clone())
    }
}

/// The future of a call of the proxy's service (boxed by `BoxCloneSyncService`).
type ProxyFuture = <ProxyService as tower::Service<Request<RequestBody>>>::Future;

impl Serving {
    /// Calls the connection's copy of the service with `req` ([`conn::call_copy`]: in place
    /// when it is ready at once, which the proxy's stack always is: every layer forwards
    /// `poll_ready` to the upstream client, which is always ready).
    fn call(
        &self,
        req: Request<RequestBody>,
    ) -> futures_util::future::Either<ProxyFuture, ProxyFuture> {
        conn::call_copy(&self.service, || self.state.service.clone(), req)
    }
}

type HandleFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl tower::Service<Request<EdgeBody>> for Handle {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<EdgeBody>) -> Self::Future {
        let serving = self.serving.clone();
        Box::pin(async move { Ok(handle(serving, req).await) })
    }
}

/// The spend store of the budgets on this machine (with a tenants file): the redb file
/// `spend_path`, or memory.
fn local_spend(
    config: &ProxyConfig,
) -> Result<Option<Arc<dyn crate::tenant::spend::SpendStore>>, BoxError> {
    if config.tenants.is_none() {
        return Ok(None);
    }
    Ok(Some(match &config.spend_path {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let store = crate::tenant::spend::DiskSpend::open(path)
                .map_err(|e| format!("spend store {}: {e}", path.display()))?;
            Arc::new(store)
        }
        None => Arc::new(crate::tenant::spend::MemorySpend::new()),
    }))
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
        cache_secret: config.cache_secret.clone(),
        metrics: config.metrics,
        // issue 16
        adaptive_concurrency: config
            .adaptive_concurrency
            .then(|| crate::concurrency::Aimd {
                initial: config.initial_in_flight,
                min: config.min_in_flight,
                max: config.max_in_flight.unwrap_or(64),
                ..crate::concurrency::Aimd::default()
            }),
        concurrency_ramp_up: config.ramp_up,
        retry_budget: config.retry_budget.map(|ratio| {
            crate::retry::RetryBudget::new(
                Duration::from_secs(10),
                config.retry_budget_min_per_sec,
                ratio,
            )
        }),
        pacing: config.pacing,
        // issue 15: a tenant's own limits, only with a tenants file (without one no request
        // carries a tenant: nothing changes).
        tenant_limit: config.tenants.is_some(),
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
///
/// With a tenants file, an admin tenant sees every tenant; any other tenant sees its own entry
/// only (not the other teams' usage and spend).
async fn status_page(state: &State, viewer: Option<&crate::tenant::Tenant>) -> Response<ProxyBody> {
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
                // Prompt-cache tokens per key and group (issue 17).
                "prompt_cache": s.prompt_cache.map(|c| serde_json::json!({
                    "read_tokens": c.read_tokens, "write_tokens": c.write_tokens,
                    "uncached_tokens": c.uncached_tokens,
                    "hit_ratio": (c.hit_ratio() * 1000.0).round() / 1000.0})),
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
    let tenants = match state.tenant_table() {
        Some(table) => {
            let shown: Vec<crate::tenant::Tenant> = table
                .tenants()
                .iter()
                .filter(|t| viewer.is_none_or(|v| v.is_admin() || v.name() == t.name()))
                .cloned()
                .collect();
            let spent = budget_use(state, &shown).await;
            Some(
                shown
                    .iter()
                    .map(|t| tenant_status(t, spent.get(t.name()).copied()))
                    .collect::<Vec<_>>(),
            )
        }
        None => None,
    };
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
        "concurrency": state.concurrency.as_ref().map(|c| serde_json::json!({
            "limit": c.limit(),
            "in_flight": c.in_flight(),
            "adaptive": state.config.adaptive_concurrency,
        })),
        "pacing": state.paced,
        "tenants": tenants,
    });
    json_response(StatusCode::OK, body.to_string())
}

/// `POST /v1/proxy/reload`: re-reads the tenants file and the keys file ([`Proxy::reload`]),
/// for an admin tenant only. A refused file is a 400 naming the field; the running
/// configuration is kept.
fn reload_route(state: &State, tenant: Option<&crate::tenant::Tenant>) -> Response<ProxyBody> {
    match tenant {
        Some(t) if t.is_admin() => {}
        _ => {
            tracing::debug!(
                tenant = tenant.map(|t| t.name()),
                "reload refused: not an admin"
            );
            return api_error(
                ApiErrorKind::Permission,
                "POST /v1/proxy/reload is for a tenant with `admin = true` in the tenants file",
            );
        }
    }
    match reload(state) {
        Ok(report) => json_response(StatusCode::OK, report.to_json().to_string()),
        Err(err) => {
            tracing::warn!(%err, "reload refused; the running configuration is kept");
            api_error(
                ApiErrorKind::InvalidRequest,
                &format!("reload refused, the running configuration is kept: {err}"),
            )
        }
    }
}

/// What each tenant with a budget has spent this UTC day and month, in micro-USD, as the
/// budget layer counts it ([`BudgetLayer::spend`](crate::tenant::budget::BudgetLayer::spend):
/// the store's totals plus costs settled here and not yet stored), read concurrently and
/// bounded in time: a store that does not answer leaves the figures out rather than the page.
async fn budget_use(
    state: &State,
    tenants: &[crate::tenant::Tenant],
) -> std::collections::HashMap<String, (u64, u64)> {
    let Some(budget) = &state.budget else {
        return std::collections::HashMap::new();
    };
    let with_budget = tenants.iter().filter(|t| {
        let b = t.budget_value();
        b.daily().is_some() || b.monthly().is_some()
    });
    let reads = with_budget.map(|t| async move {
        match budget.spend(t.name()).await {
            Ok(s) => Some((t.name().to_owned(), (s.day, s.month))),
            Err(err) => {
                tracing::warn!(%err, tenant = t.name(), "status page: spend store unreadable");
                None
            }
        }
    });
    match tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::future::join_all(reads),
    )
    .await
    {
        Ok(spent) => spent.into_iter().flatten().collect(),
        Err(_) => {
            tracing::warn!("status page: spend store did not answer within 2 s");
            std::collections::HashMap::new()
        }
    }
}

/// One tenant on the status page: its settings, counters and budget use (its name, never its
/// tokens). `spent`: micro-USD this UTC day and month, when known.
fn tenant_status(t: &crate::tenant::Tenant, spent: Option<(u64, u64)>) -> serde_json::Value {
    let s = t.stats();
    let budget = t.budget_value();
    let usd = |micro: u64| micro as f64 / 1e6;
    let used = |micro: u64, limit: Option<f64>| {
        limit.map(|l| {
            if l > 0.0 {
                ((micro as f64 / 1e6 / l) * 1e6).round() / 1e6
            } else {
                1.0
            }
        })
    };
    let limits: serde_json::Map<String, serde_json::Value> = t
        .limits()
        .iter()
        .map(|(group, l)| {
            (
                group.clone(),
                serde_json::json!({"rpm": l.rpm, "itpm": l.itpm, "otpm": l.otpm}),
            )
        })
        .collect();
    serde_json::json!({
        "name": t.name(),
        "weight": t.weight_value(),
        "priority": t.priority_class().as_str(),
        "admin": t.is_admin(),
        "requests": s.requests(),
        "input_tokens": s.input_tokens(),
        "output_tokens": s.output_tokens(),
        "cost_usd": (s.cost_usd() * 1e6).round() / 1e6,
        "queue_wait_s": (s.queue_wait().as_secs_f64() * 1000.0).round() / 1000.0,
        "refusals": s.refusals(),
        "limits": limits,
        "budget": serde_json::json!({
            "usd_per_day": budget.daily(),
            "usd_per_month": budget.monthly(),
            "spent_today_usd": spent.map(|(day, _)| usd(day)),
            "spent_this_month_usd": spent.map(|(_, month)| usd(month)),
            "day_used": spent.and_then(|(day, _)| used(day, budget.daily())),
            "month_used": spent.and_then(|(_, month)| used(month, budget.monthly())),
        }),
    })
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
    let mut text = crate::metrics::prometheus::render(handle);
    // Per tenant, read from the counters now: a tenant removed by a reload is not shown.
    if let Some(table) = state.tenant_table() {
        text.push_str(&crate::metrics::prometheus::render_tenants(table.tenants()));
    }
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
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

// Cold: every caller is a refusal or an error path; out of line, with its branches laid out
// after the forwarding path's code.
#[cold]
#[inline(never)]
pub(crate) fn api_error(kind: ApiErrorKind, message: &str) -> Response<ProxyBody> {
    let err = ApiError::new(kind, message);
    json_response(err.status(), err.to_envelope())
}

/// The token a client presented: a non-empty `x-api-key`, else `Authorization: Bearer <token>`
/// (the scheme in any case, RFC 9110 §11.1).
fn presented_token<B>(req: &Request<B>) -> Option<&str> {
    let api_key = req
        .headers()
        .get(&X_API_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    if api_key.is_some() {
        return api_key;
    }
    let auth = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &Secret) -> bool {
    let b = b.expose().as_bytes();
    let a = a.as_bytes();
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The whole request body, or its error, or `Err(Elapsed)` when it did not arrive by the
/// deadline.
///
/// A body that came with its head (the usual API request: one frame, its length known) is
/// that frame's bytes, read with one poll: no deadline timer (`timeout_at` and its drop,
/// ~0.4k instructions), no `Collect` and its list of chunks (~0.6k). A body still arriving,
/// or in several frames, is collected under the deadline.
async fn read_body(
    mut body: EdgeBody,
    deadline: Deadline,
) -> Result<Result<Bytes, BoxError>, tokio::time::error::Elapsed> {
    use http_body::Body as _;
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut body).poll_frame(cx))
    })
    .await;
    let first = match first {
        std::task::Poll::Ready(None) => return Ok(Ok(Bytes::new())),
        std::task::Poll::Ready(Some(Err(err))) => return Ok(Err(err)),
        std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if body.is_end_stream() => return Ok(Ok(data)),
            // More to come: the first bytes (none for a trailers frame) go first.
            Ok(data) => data,
            Err(_trailers) => Bytes::new(),
        },
        std::task::Poll::Pending => Bytes::new(),
    };
    Box::pin(read_rest(first, body, deadline)).await
}

/// The rest of a body that did not come whole with its head, after its `first` bytes: in
/// its own boxed future, so that its timer and collector are not part of every request's.
async fn read_rest(
    first: Bytes,
    body: EdgeBody,
    deadline: Deadline,
) -> Result<Result<Bytes, BoxError>, tokio::time::error::Elapsed> {
    let rest = tokio::time::timeout_at(deadline.0, body.collect()).await?;
    Ok(rest.map(|rest| {
        if first.is_empty() {
            return rest.to_bytes();
        }
        let rest = rest.to_bytes();
        let mut all = bytes::BytesMut::with_capacity(first.len() + rest.len());
        all.extend_from_slice(&first);
        all.extend_from_slice(&rest);
        all.freeze()
    }))
}

async fn handle(serving: Arc<Serving>, mut req: Request<EdgeBody>) -> Response<ProxyBody> {
    let state: &State = &serving.state;
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => {
            return json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"));
        }
        (&Method::GET, "/metrics") => return metrics_page(state),
        _ if path.starts_with("/v1/") => {}
        _ => {
            let shown: String = path.chars().take(200).collect();
            return api_error(ApiErrorKind::NotFound, &format!("no route for {shown}"));
        }
    }

    // Decided from the headers alone: an unauthenticated client never gets its body read.
    let config = &state.config;
    let mut tenant = None;
    if let Some(table) = state.tenant_table() {
        match presented_token(&req).and_then(|token| table.authenticate(token)) {
            Some(found) => tenant = Some(found.clone()),
            None => {
                tracing::debug!("tenant token missing or unknown: 401 before reading the body");
                return api_error(
                    ApiErrorKind::Authentication,
                    "invalid proxy token: send your tenant's token as x-api-key",
                );
            }
        }
    } else if !config.client_tokens.is_empty() {
        let ok = presented_token(&req)
            .is_some_and(|t| config.client_tokens.iter().any(|s| same_secret(t, s)));
        if !ok {
            tracing::debug!("client token missing or unknown: 401 before reading the body");
            return api_error(
                ApiErrorKind::Authentication,
                "invalid proxy token: send one of the proxy's client tokens as x-api-key",
            );
        }
    }
    // The status page names keys and tenants' usage: behind the client tokens like the API.
    if req.method() == Method::GET && path == "/v1/proxy/status" {
        // Boxed: the status page's future (with the budget store's reads) would otherwise
        // widen every forwarded request's future.
        return Box::pin(status_page(state, tenant.as_ref())).await;
    }
    if req.method() == Method::POST && path == "/v1/proxy/reload" {
        return reload_route(state, tenant.as_ref());
    }
    if path == "/v1/proxy" || path.starts_with("/v1/proxy/") {
        // The proxy's own namespace: never forwarded upstream (with the proxy's key).
        return api_error(
            ApiErrorKind::NotFound,
            "the proxy's routes are GET /v1/proxy/status and POST /v1/proxy/reload",
        );
    }
    // Only paths that name one resource under /v1/ leave with the proxy's key: no `..`, no
    // encoded slash, no `//` (refused, not normalised; see `client::check_path`).
    if let Err(refusal) = crate::client::check_path(path) {
        tracing::debug!(?refusal, "request path refused");
        return api_error(ApiErrorKind::InvalidRequest, &refusal.message(path));
    }
    // A blank `x-api-key` was removed by the front (`front.rs`), in its walk of the headers.
    if let Some(tenant) = &tenant {
        // A tenant's token is the proxy's, never the upstream's: it names the tenant (the
        // fair queues, limits, budgets and the cache partition read the extensions) and stays
        // here.
        tracing::debug!(tenant = tenant.name(), "tenant authenticated");
        req.extensions_mut().insert(CacheTenant::new(tenant.name()));
        req.extensions_mut().insert(tenant.clone());
        req.headers_mut().remove(header::AUTHORIZATION);
        req.headers_mut().remove(&X_API_KEY);
        if config.api_keys.is_empty() {
            // Only with the built-in simulator (the configuration requires upstream keys
            // otherwise), which wants some key: one for all tenants, as a real key would be.
            req.headers_mut().insert(
                X_API_KEY.clone(),
                HeaderValue::from_static("proxy-simulator"),
            );
        }
    } else if !config.api_keys.is_empty() {
        // The proxy holds the upstream keys (the key pool picks one per request): the client's
        // credential never goes upstream. It still names the cache tenant, so that clients
        // with different proxy tokens never share cached answers.
        let tenant = presented_token(&req)
            .map(|t| KeyId::from_api_key(t).as_str().to_owned())
            .unwrap_or_else(|| "proxy".to_owned());
        req.extensions_mut().insert(CacheTenant::new(tenant));
        req.headers_mut().remove(header::AUTHORIZATION);
        req.headers_mut().remove(&X_API_KEY);
    }
    // The proxy's own request id names this request in its log and on the answers it makes
    // itself (`front.rs`: an extension, never a header sent upstream, whose `request-id`
    // answer goes back to the client).
    let request_id = req.extensions().get::<ProxyRequestId>().copied();

    // The proxy's deadline bounds every wait below (the body, the quota queue, retries),
    // unless the request already carries an earlier one.
    let deadline = match req.extensions().get::<Deadline>() {
        Some(d) => *d,
        None => {
            let d = Deadline::after(config.deadline);
            req.extensions_mut().insert(d);
            d
        }
    };
    // Buffered here rather than through `BufferBody`: the same work with concrete types, which
    // keeps this future provably `Send` for hyper (a rustc limitation with higher-ranked
    // `Into<BoxError>` bounds in async blocks). The 32 MB limit is tower-http's
    // (`RequestBodyLimitLayer` in `edge::stack`): its error surfaces here.
    let (parts, body) = req.into_parts();
    let body = match read_body(body, deadline).await {
        Ok(Ok(bytes)) => RequestBody::from(bytes),
        Ok(Err(err)) => {
            return error_response(
                &BufferBodyError::from_body_error(err, config.body_limit).into(),
            );
        }
        Err(_) => {
            return api_error(
                ApiErrorKind::RequestTimeout,
                "the request body did not arrive within the proxy's deadline",
            );
        }
    };
    let req = Request::from_parts(parts, body);
    state.counters.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(tenant) = &tenant {
        tenant.stats().record_request();
    }
    match serving.call(req).await {
        Ok(mut resp) => {
            crate::client::remove_hop_by_hop(resp.headers_mut());
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
        Err(err) => failed(state, &err, request_id),
    }
}

/// The answer to a request the stack failed: counted, logged, an Anthropic-style error.
/// Out of line (cold), so that the forwarding path's code stays short.
#[cold]
#[inline(never)]
fn failed(
    state: &State,
    err: &BoxError,
    request_id: Option<ProxyRequestId>,
) -> Response<ProxyBody> {
    state.counters.errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %err, request_id = ?request_id, "request failed in the proxy");
    error_response(err)
}
