use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower::ServiceExt;
use tower_service::Service;

use super::body::CacheBody;
use super::config::Config;
use super::flights::{FlightGuard, Join, Shared};
use super::future::{Miss, Plan, ResponseFuture, Stored, mark, store_head, store_read};
use super::hints;
use super::key::{CacheKey, KeyBase, Partition, RequestHeaders};
use super::layer::CacheLayer;
use super::live::LiveBody;
use super::store::{CacheStore, CachedResponse};
use super::{CacheMode, CacheStatus};
use crate::BoxError;
use crate::anthropic::parsed_names as names;
use crate::anthropic::{RequestMeta, is_messages_call};
use crate::body::RequestBody;
use crate::fallback::ServedModel;

/// A response cache in front of `S`: see the [module docs](super).
///
/// `poll_ready` is always ready: a hit never waits for the inner service's capacity (a hit
/// skips the rate limiter and the concurrency cap). It polls the inner service's readiness
/// too, without waiting for it: a miss settled in `call` (its store lookup needed no I/O) is
/// sent to the inner service at once when it was ready; otherwise the request is sent to a
/// clone of the inner service, driven with [`ServiceExt::oneshot`], so `S` must be `Clone`.
/// A request answered without the inner service (a hit) gives up the readiness it found, so
/// a reservation made by the inner service's `poll_ready` (a `ConcurrencyLimit` permit, a
/// `Buffer` slot) is not held by a caller that only gets hits.
pub struct Cache<S> {
    inner: S,
    /// The inner service said it was ready, and has not been called since.
    inner_ready: bool,
    /// The options and the flights of this cache, in one `Arc`: the service is cloned per
    /// request (one reference count, not two).
    config: Arc<Config>,
}

impl<S> Cache<S> {
    /// A cache over `store` in front of `inner`, with default options.
    pub fn new(inner: S, store: impl CacheStore) -> Self {
        tower_layer::Layer::layer(&CacheLayer::new(store), inner)
    }

    /// A [`CacheLayer`] over `store`.
    pub fn layer(store: impl CacheStore) -> CacheLayer {
        CacheLayer::new(store)
    }

    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        // Whether the scans of `RequestMeta` record the key's hints (read once): see `hints`
        // (a cache in `all` mode turns them on now, one in `deterministic` once it keys a
        // quarter of its requests; only a cost, the key is the same).
        hints::on_build(config.mode);
        Self {
            inner,
            inner_ready: false,
            config,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the cache, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Waits until every answer queued for storing so far is in the store (see
    /// [`CacheLayer::flush`]).
    pub async fn flush(&self) {
        self.config.writer.flush().await;
    }
}

impl<S: Clone> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            // The clone's inner service has not been polled.
            inner_ready: false,
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("ttl", &self.config.ttl)
            .finish_non_exhaustive()
    }
}

impl<S, ResBody> Service<Request<RequestBody>> for Cache<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never waits: a hit does not need the inner service. Its readiness (an error
        // included) is found again by `oneshot` on a miss it was not ready for.
        if !self.inner_ready {
            self.inner_ready = matches!(self.inner.poll_ready(cx), Poll::Ready(Ok(())));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let Some(plan) = plan(&self.config, &mut req) else {
            if std::mem::take(&mut self.inner_ready) {
                return ResponseFuture::bypass(self.inner.call(req));
            }
            let inner = self.take_inner();
            return ResponseFuture::boxed(Box::pin(async move {
                let mut res = inner
                    .oneshot(req)
                    .await
                    .map_err(Into::into)?
                    .map(CacheBody::inner);
                mark(&mut res, CacheStatus::Bypass);
                Ok(res)
            }));
        };
        let next = if plan.read {
            match begin(&self.config, &plan, &mut req) {
                Begun::Answered(res) => {
                    self.release_inner();
                    return ResponseFuture::ready(res);
                }
                Begun::Miss(guard) => Next::Miss(guard),
                Begun::Later(join) => Next::Join(join),
            }
        } else {
            Next::Miss(None)
        };
        match next {
            // The usual miss: no allocation of the cache's own, no clone of the inner service.
            Next::Miss(guard) if std::mem::take(&mut self.inner_ready) => {
                tracing::trace!("cache miss settled at once");
                let miss = Miss {
                    config: self.config.clone(),
                    plan,
                    guard,
                };
                ResponseFuture::upstream(self.inner.call(req), miss)
            }
            next => ResponseFuture::boxed(Box::pin(run(
                self.take_inner(),
                self.config.clone(),
                req,
                plan,
                next,
            ))),
        }
    }
}

impl<S: Clone> Cache<S> {
    /// The inner service for a request driven by `oneshot`: the one `poll_ready` found ready
    /// (a clone takes its place, as tower's `Steer` and `Buffer` users do), or a clone.
    fn take_inner(&mut self) -> S {
        let clone = self.inner.clone();
        if std::mem::take(&mut self.inner_ready) {
            std::mem::replace(&mut self.inner, clone)
        } else {
            clone
        }
    }

    /// A request answered without the inner service: a readiness `poll_ready` found is given
    /// up. A ready service may hold a reservation (tower's `ConcurrencyLimit` holds a permit,
    /// `Buffer` a slot of its channel from `poll_ready` to `call`): kept by a cache clone that
    /// serves only hits, it would hold that capacity from every other caller.
    fn release_inner(&mut self) {
        if std::mem::take(&mut self.inner_ready) {
            tracing::trace!("cache hit: the inner service's readiness given up");
            self.inner = self.inner.clone();
        }
    }
}

/// What [`begin`] settled.
enum Begun<B> {
    /// A hit, or a share of an identical stream in flight.
    Answered(Response<CacheBody<B>>),
    /// Not stored: this request leads its flight (when it has one) and goes upstream.
    Miss(Option<FlightGuard>),
    /// Only an asynchronous step can tell (waiting for the leader, a store lookup over I/O).
    Later(Join),
}

/// Where the asynchronous path of a cached request starts.
enum Next {
    /// Join the flight (again), or go on with the join made.
    Join(Join),
    /// Go upstream, leading the flight when there is a guard.
    Miss(Option<FlightGuard>),
}

/// The request's `x-tower-claude-cache` directive (the header is removed: it is not sent
/// upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Directive {
    /// Cache it even if the mode would not (`use`).
    Use,
    /// Neither read nor store (`bypass`).
    Bypass,
    /// Do not read; store the fresh answer (`refresh`).
    Refresh,
}

fn take_directive(headers: &mut http::HeaderMap) -> Option<Directive> {
    let mut directive = None;
    if let http::header::Entry::Occupied(entry) = headers.entry(&names::X_TOWER_CLAUDE_CACHE) {
        for value in entry.remove_entry_mult().1 {
            let d = match value
                .to_str()
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                Ok("use") => Directive::Use,
                Ok("bypass") => Directive::Bypass,
                Ok("refresh") => Directive::Refresh,
                _ => {
                    tracing::debug!("ignoring an unknown x-tower-claude-cache request value");
                    continue;
                }
            };
            // The most restrictive wins: bypass, then refresh, then use.
            directive = Some(match (directive, d) {
                (Some(Directive::Bypass), _) | (_, Directive::Bypass) => Directive::Bypass,
                (Some(Directive::Refresh), _) | (_, Directive::Refresh) => Directive::Refresh,
                _ => Directive::Use,
            });
        }
    }
    directive
}

/// Whether a request is deterministic: `temperature` present and 0. At temperature 0 the
/// API takes the most likely token at each step; `top_k` and `top_p` only narrow the choice
/// around that token, so they do not make it sample. A request without `temperature` gets the
/// API default, 1.0, and is sampled.
fn is_deterministic(meta: &RequestMeta) -> bool {
    meta.temperature == Some(0.0)
}

fn plan(config: &Config, req: &mut Request<RequestBody>) -> Option<Plan> {
    if !is_messages_call(req.method(), req.uri().path()) || config.mode == CacheMode::Off {
        // The directive header never goes upstream, whatever the request.
        take_directive(req.headers_mut());
        return None;
    }
    // The scan the layers below reuse; a body it cannot read is passed through (upstream
    // answers 400).
    // Usually scanned already by a layer above: then the extension is looked up once, here,
    // and the meta kept (a scan here looks it up again, as does a directive taken out).
    let mut meta = match req.extensions().get::<RequestMeta>() {
        Some(meta) => meta,
        None => {
            if RequestMeta::get_or_scan(req).is_err() {
                take_directive(req.headers_mut());
                return None;
            }
            req.extensions().get::<RequestMeta>()?
        }
    };
    // What the cache reads from the headers, in one pass (read once); the directive is
    // taken out when there is one, and the headers looked at again then.
    let mut seen = RequestHeaders::of(req.headers());
    let mut directive = None;
    if seen.directive {
        directive = take_directive(req.headers_mut());
        seen = RequestHeaders::of(req.headers());
        meta = req.extensions().get::<RequestMeta>()?;
    }
    if directive == Some(Directive::Bypass) {
        return None;
    }
    let mut read = directive != Some(Directive::Refresh);
    if seen.cache_control {
        for value in req.headers().get_all(http::header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',').map(str::trim) {
                if directive.eq_ignore_ascii_case("no-store") {
                    return None;
                }
                if directive.eq_ignore_ascii_case("no-cache")
                    || directive.eq_ignore_ascii_case("max-age=0")
                {
                    read = false;
                }
            }
        }
    }
    if config.mode == CacheMode::Deterministic {
        let keyed = directive == Some(Directive::Use) || is_deterministic(meta);
        hints::on_decision(keyed);
        if !keyed {
            tracing::trace!("not deterministic: not cached");
            return None;
        }
    }
    let partition = Partition::of_seen(
        &config.keys.partition,
        req.extensions(),
        &seen,
        config.tenant.as_ref(),
    );
    let base = KeyBase::new_seen(&partition, req.method(), req.uri(), &seen, req.headers());
    // The canonical body, from what the scan of `meta` recorded (or by the scanner again); a
    // body that is not a JSON object is passed through (upstream answers 400).
    let key = base.key_of_scanned(&config.keys, req.body().bytes(), meta)?;
    // The catalogue's shared name when a layer above resolved the model (no copy).
    let requested = meta
        .model
        .as_deref()
        .filter(|model| !model.is_empty())
        .map(|model| match meta.resolved_entry() {
            Some(entry) if entry.id() == model => entry.shared_id().clone(),
            _ => model.into(),
        });
    // Fallback's own test (`opted_out_of`), its header read only when the pass saw it.
    let no_fallback = if seen.fallback {
        crate::fallback::opted_out_of(req)
    } else {
        req.extensions()
            .get::<crate::fallback::NoFallback>()
            .is_some()
    };
    Some(Plan {
        key,
        base,
        body: req.body().bytes().clone(),
        requested,
        read,
        no_fallback,
    })
}

/// A follower's share of a stream in flight: served as a hit (it uses no quota). The head is
/// the leader's, `x-tower-claude-model` included.
fn live_hit<B>(body: LiveBody) -> Response<CacheBody<B>> {
    let mut res = Response::new(());
    *res.status_mut() = body.live().status();
    *res.headers_mut() = body.live().headers().clone();
    let mut res = res.map(|()| CacheBody::live(body));
    mark(&mut res, CacheStatus::Hit);
    res
}

/// A stored answer, saying which model wrote it (`x-tower-claude-model` and a
/// [`ServedModel`] extension).
fn hit<B>(entry: CachedResponse, requested: Option<&Arc<str>>) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::full(entry.body().clone()));
    *res.status_mut() = entry.status();
    *res.headers_mut() = entry.headers_with_room(2);
    let served = entry.shared_model().or(requested);
    if let Ok(v) = HeaderValue::from_str(served.map_or("", |s| s)) {
        res.headers_mut()
            .insert(names::X_TOWER_CLAUDE_MODEL.clone(), v);
    }
    if let (Some(requested), Some(served)) = (requested, served) {
        // The names shared, not copied.
        res.extensions_mut().insert(ServedModel {
            requested: requested.clone(),
            served: served.clone(),
            attempts: 0,
            failovers: 0,
        });
    }
    mark(&mut res, CacheStatus::Hit);
    res
}

/// Joins the flight of `plan` and, leading it, looks the key up, when both can be done at
/// once: the usual request, whose store lookup needs no I/O ([`CacheStore::get_now`]).
fn begin<B>(config: &Config, plan: &Plan, req: &mut Request<RequestBody>) -> Begun<B> {
    match config.flights.join(plan.flight()) {
        Join::Live(body) => Begun::Answered(live_hit(body)),
        Join::Lead(guard) => match find_now(config, plan, req) {
            Some(Some(entry)) => {
                guard.complete(&entry);
                Begun::Answered(hit(entry, plan.requested.as_ref()))
            }
            Some(None) => Begun::Miss(Some(guard)),
            None => Begun::Later(Join::Lead(guard)),
        },
        join @ Join::Follow(_) => Begun::Later(join),
    }
}

/// The paths [`Cache::call`] did not settle at once: following an identical request in
/// flight, a store lookup that needs I/O, an inner service that was not ready.
async fn run<S, ResBody>(
    inner: S,
    config: Arc<Config>,
    mut req: Request<RequestBody>,
    plan: Plan,
    next: Next,
) -> Result<Response<CacheBody<ResBody>>, BoxError>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let guard = match next {
        Next::Miss(guard) => guard,
        // Each turn either follows the in-flight twin, or leads: the leader looks the key up
        // (once: whatever a previous leader stored is found, as it stored before leaving its
        // flight) and shares what it found with the followers that joined meanwhile. A
        // follower whose leader failed or was cancelled comes back here and joins again.
        Next::Join(mut join) => loop {
            match join {
                Join::Follow(rx) => match rx.await {
                    Ok(Shared::Entry(entry)) => return Ok(hit(entry, plan.requested.as_ref())),
                    Ok(Shared::Live(body)) => return Ok(live_hit(body)),
                    // The leader failed or was cancelled: look again.
                    Err(_) => {}
                },
                Join::Live(body) => return Ok(live_hit(body)),
                Join::Lead(g) => {
                    if let Some(entry) = find(&config, &plan, &mut req).await {
                        g.complete(&entry);
                        return Ok(hit(entry, plan.requested.as_ref()));
                    }
                    break Some(g);
                }
            }
            join = config.flights.join(plan.flight());
        },
    };
    let res = inner.oneshot(req).await.map_err(Into::into)?;
    let mut res = match store_head(&config, plan, res, guard) {
        Stored::Done(res) => res,
        Stored::Read(peek, reading) => store_read(&config, reading, peek.await),
    };
    mark(&mut res, CacheStatus::Miss);
    Ok(res)
}

/// [`find`] when the store answers at once ([`CacheStore::get_now`]): `None` when it cannot.
fn find_now(
    config: &Config,
    plan: &Plan,
    req: &mut Request<RequestBody>,
) -> Option<Option<CachedResponse>> {
    if let Some(entry) = lookup_now(config, &plan.key)? {
        return Some(Some(entry));
    }
    if !config.store.may_hold_other_models(plan.requested())
        && !config.writer.queued_other_models(plan.requested())
    {
        tracing::trace!("no entry of another model stored: fallback not asked");
        return Some(None);
    }
    let Some(choice) = plan.fallback_choice(config, req) else {
        return Some(None);
    };
    let entry = lookup_now(config, &plan.key_for(&config.keys, &choice))?;
    if entry.is_some() {
        tracing::debug!(
            requested = plan.requested(),
            served = %choice,
            "cache hit from the model fallback would choose now"
        );
    }
    Some(entry)
}

/// [`lookup`] when the store answers at once: `None` when it cannot.
fn lookup_now(config: &Config, key: &CacheKey) -> Option<Option<CachedResponse>> {
    if let Some(entry) = config.writer.pending(key) {
        return Some(Some(entry));
    }
    match config.store.get_now(key)? {
        Ok(entry) => Some(entry),
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "cache store lookup failed; treated as a miss");
            Some(None)
        }
    }
}

/// The answer to serve: the requested model's own, else the answer of the model the fallback
/// layer below would choose now (never another model's answer once the requested model has
/// quota again, nor when the request turned fallback off).
async fn find(
    config: &Config,
    plan: &Plan,
    req: &mut Request<RequestBody>,
) -> Option<CachedResponse> {
    if let Some(found) = find_now(config, plan, req) {
        return found;
    }
    if let Some(entry) = lookup(config, &plan.key).await {
        return Some(entry);
    }
    if !config.store.may_hold_other_models(plan.requested())
        && !config.writer.queued_other_models(plan.requested())
    {
        tracing::trace!("no entry of another model stored: fallback not asked");
        return None;
    }
    let choice = plan.fallback_choice(config, req)?;
    let entry = lookup(config, &plan.key_for(&config.keys, &choice)).await?;
    tracing::debug!(
        requested = plan.requested(),
        served = %choice,
        "cache hit from the model fallback would choose now"
    );
    Some(entry)
}

async fn lookup(config: &Config, key: &CacheKey) -> Option<CachedResponse> {
    if let Some(entry) = config.writer.pending(key) {
        return Some(entry);
    }
    match config.store.get(key).await {
        Ok(entry) => entry,
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "cache store lookup failed; treated as a miss");
            None
        }
    }
}
