//! [`MockClaude`]: request handling.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;

use super::body::{Chunk, MockBody};
use super::render::{self, Answer};
use super::state::{Flight, Shared};
use super::{Fault, MockClaudeBuilder, MockStats};
use crate::BoxError;
use crate::anthropic::{
    ApiError, ApiErrorKind, CacheBreakpoint, CacheTtl, KeyId, RateLimitGroup, RequestMeta,
    header_names,
};
use crate::quota::prompt_cache::{MIN_CACHEABLE_TOKENS, prefix_id};

/// An in-process Anthropic Messages API simulator; see the [module docs](super).
///
/// Clones share one state (buckets, counters, fault queue).
#[derive(Clone)]
pub struct MockClaude {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for MockClaude {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockClaude")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MockClaude {
    /// A builder with the defaults (see [`MockClaudeBuilder`]).
    pub fn builder() -> MockClaudeBuilder {
        MockClaudeBuilder::new()
    }

    pub(crate) fn from_builder(builder: MockClaudeBuilder) -> Self {
        Self {
            shared: Arc::new(Shared::new(builder)),
        }
    }

    /// Queues a scripted outcome for the next valid Messages request (see [`Fault`]).
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    /// Switches spend-cap mode on or off (see [`MockClaudeBuilder::spend_cap`]).
    pub fn set_spend_cap(&self, on: bool) {
        self.shared.lock().spend_cap = on;
    }

    /// Changes the limits of every key and group while serving (an organisation moving to
    /// another usage tier): existing buckets take the new capacities, and a raise adds the
    /// extra capacity to their level at once (a cut keeps the level, capped at the new
    /// capacity). Later answers carry the new `-limit` headers.
    ///
    /// ```
    /// use tower_claude::testing::{MockClaude, MockLimits};
    ///
    /// let mock = MockClaude::builder().default_limits(MockLimits::new(60, 40_000, 8_000)).build();
    /// mock.set_limits(MockLimits::new(240, 40_000, 8_000));
    /// ```
    pub fn set_limits(&self, limits: super::MockLimits) {
        let now = tokio::time::Instant::now();
        let mut inner = self.shared.lock();
        inner.limits_override = Some(limits);
        for buckets in inner.buckets.values_mut() {
            buckets.resize(limits, now);
        }
    }

    /// The levels (requests, input tokens, output tokens) of the buckets of `(key, group)`
    /// now, `None` before its first request: what the simulated server would answer.
    pub(crate) fn levels(&self, key: &KeyId, group: &RateLimitGroup) -> Option<[f64; 3]> {
        let now = tokio::time::Instant::now();
        let mut inner = self.shared.lock();
        let b = inner.buckets.get_mut(&(key.clone(), group.clone()))?;
        Some([
            b.requests.level(now),
            b.input.level(now),
            b.output.level(now),
        ])
    }

    /// A copy of the counters.
    pub fn stats(&self) -> MockStats {
        self.shared.lock().stats.clone()
    }
}

impl<B> Service<Request<B>> for MockClaude
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<MockBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let shared = self.shared.clone();
        let seq = {
            let mut inner = shared.lock();
            inner.stats.received += 1;
            inner.seq += 1;
            inner.seq
        };
        ResponseFuture {
            inner: Box::pin(async move { Ok(handle(shared, seq, req).await) }),
        }
    }
}

/// The response future of [`MockClaude`]; it never fails.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<MockBody>, BoxError>> + Send>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<MockBody>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Which endpoint a request is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
}

/// A validated request body.
struct Parsed {
    model: String,
    max_tokens: u64,
    stream: bool,
    input_tokens: u64,
    cache_breakpoints: Vec<CacheBreakpoint>,
}

/// How the simulated prompt cache splits a request's input.
#[derive(Clone, Copy, Default)]
struct CacheSplit {
    /// After the last breakpoint (`usage.input_tokens`).
    uncached: u64,
    /// `cache_creation_input_tokens`.
    write: u64,
    /// `cache_read_input_tokens`.
    read: u64,
    /// Of `write`, the 1-hour writes (`cache_creation.ephemeral_1h_input_tokens`).
    write_1h: u64,
    /// What counts toward the input limit.
    counted: u64,
}

/// The most prefixes the simulated prompt cache holds before expired ones are dropped.
const PROMPT_CACHE_SWEEP: usize = 100_000;

/// Splits `parsed`'s input like the API's prompt cache: the longest prefix (up to a
/// `cache_control` breakpoint) cached for this key and model within its TTL is read, the rest
/// up to the last breakpoint is written, what follows is uncached. Prefixes shorter than the
/// minimum cacheable length (1,024 tokens here) are not cached. Returns the prefix ids to
/// cache (or refresh) with their TTLs when the request is admitted.
fn cache_split(
    inner: &super::state::Inner,
    key: &KeyId,
    parsed: &Parsed,
    reads_count: bool,
    now: Instant,
) -> (CacheSplit, Vec<(u128, Duration)>) {
    let mut last = 0;
    let mut read = 0;
    let mut marks = Vec::new();
    for bp in &parsed.cache_breakpoints {
        if bp.tokens < MIN_CACHEABLE_TOKENS {
            continue;
        }
        let id = prefix_id(key, &parsed.model, bp);
        if inner.prompt_cache.get(&id).is_some_and(|&t| t > now) {
            read = read.max(bp.tokens);
        }
        last = last.max(bp.tokens);
        marks.push((id, bp.ttl.duration()));
    }
    let total = parsed.input_tokens;
    let last = last.min(total);
    let read = read.min(last);
    let write = last - read;
    let uncached = total - last;
    let counted = uncached + write + if reads_count { read } else { 0 };
    // The part of the written range `read..last` up to each breakpoint, since the previous
    // one, is written with that breakpoint's TTL.
    let mut ends: Vec<(u64, CacheTtl)> = parsed
        .cache_breakpoints
        .iter()
        .filter(|bp| bp.tokens >= MIN_CACHEABLE_TOKENS)
        .map(|bp| (bp.tokens.min(last), bp.ttl))
        .collect();
    ends.sort_by_key(|(end, _)| *end);
    let (mut prev, mut write_1h) = (read, 0);
    for (end, ttl) in ends {
        if end > prev {
            if ttl == CacheTtl::OneHour {
                write_1h += end - prev;
            }
            prev = end;
        }
    }
    (
        CacheSplit {
            uncached,
            write,
            read,
            write_1h,
            counted,
        },
        marks,
    )
}

/// A response under construction: the request id and counting are added by `finish`.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: MockBody,
}

impl Reply {
    fn json(status: StatusCode, data: Bytes) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Self {
            status,
            headers,
            body: MockBody::full(data),
        }
    }

    fn error(error: &ApiError) -> Self {
        Self::json(error.status(), error.to_envelope())
    }

    fn error_with_status(status: StatusCode, error: &ApiError) -> Self {
        Self::json(status, error.to_envelope())
    }
}

async fn handle<B>(shared: Arc<Shared>, seq: u64, req: Request<B>) -> Response<MockBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let reply = route(&shared, seq, req).await;
    let mut res = Response::new(reply.body);
    *res.status_mut() = reply.status;
    *res.headers_mut() = reply.headers;
    let request_id = render::make_id("req_", shared.config.seed, seq, render::SALT_REQUEST_ID);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(header_names::REQUEST_ID, value);
    }
    shared.lock().count_status(reply.status.as_u16());
    res
}

async fn route<B>(shared: &Arc<Shared>, seq: u64, req: Request<B>) -> Reply
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/');
    let endpoint = match path {
        "/v1/messages" => Endpoint::Messages,
        "/v1/messages/count_tokens" => Endpoint::CountTokens,
        _ => {
            return Reply::error(&ApiError::new(
                ApiErrorKind::NotFound,
                format!("Not Found: {} {path}", parts.method),
            ));
        }
    };
    if parts.method != Method::POST {
        return Reply::error_with_status(
            StatusCode::METHOD_NOT_ALLOWED,
            &ApiError::new(
                ApiErrorKind::NotFound,
                format!("Method Not Allowed: {} {path}", parts.method),
            ),
        );
    }

    // Authentication.
    let Some(key) = api_key(&parts.headers) else {
        return Reply::error(&ApiError::new(
            ApiErrorKind::Authentication,
            "x-api-key header is required",
        ));
    };
    let key = KeyId::from_api_key(key);
    if let Some(allowed) = &shared.config.api_keys {
        if !allowed.contains(&key) {
            return Reply::error(&ApiError::new(
                ApiErrorKind::Authentication,
                "invalid x-api-key",
            ));
        }
    }
    let version_ok = parts
        .headers
        .get(header_names::ANTHROPIC_VERSION)
        .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
    if !version_ok {
        return Reply::error(&ApiError::new(
            ApiErrorKind::InvalidRequest,
            "anthropic-version: header is required",
        ));
    }

    // Body.
    let limit = shared.config.max_body_bytes;
    let too_large = || {
        Reply::error(&ApiError::new(
            ApiErrorKind::RequestTooLarge,
            format!("Request exceeds the maximum allowed number of bytes ({limit})"),
        ))
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return too_large(),
        Err(_) => {
            return Reply::error(&ApiError::new(
                ApiErrorKind::InvalidRequest,
                "could not read the request body",
            ));
        }
    };
    let parsed = match validate(&bytes, endpoint) {
        Ok(parsed) => parsed,
        Err(message) => {
            return Reply::error(&ApiError::new(ApiErrorKind::InvalidRequest, message));
        }
    };

    match endpoint {
        Endpoint::CountTokens => {
            let data = serde_json::json!({ "input_tokens": parsed.input_tokens }).to_string();
            Reply::json(StatusCode::OK, Bytes::from(data))
        }
        Endpoint::Messages => messages(shared, seq, key, parsed).await,
    }
}

/// The API key: `x-api-key`, else `authorization: Bearer <key>` (what recent official SDKs
/// send). Empty values count as missing.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get(header_names::X_API_KEY) {
        return key.to_str().ok().and_then(non_empty);
    }
    let auth = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = auth.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        non_empty(token)
    } else {
        None
    }
}

fn non_empty(key: &str) -> Option<&str> {
    Some(key.trim()).filter(|k| !k.is_empty())
}

/// Checks the body the way the real API does (required fields and their types).
fn validate(bytes: &[u8], endpoint: Endpoint) -> Result<Parsed, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("There was an error parsing the body: {e}"))?;
    let Some(object) = value.as_object() else {
        return Err("The request body must be a JSON object".into());
    };
    let model = match object.get("model") {
        None => return Err("model: Field required".into()),
        Some(serde_json::Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err("model: Input should be a non-empty string".into()),
    };
    match object.get("messages") {
        None => return Err("messages: Field required".into()),
        Some(serde_json::Value::Array(m)) if !m.is_empty() => {}
        Some(serde_json::Value::Array(_)) => {
            return Err("messages: at least one message is required".into());
        }
        Some(_) => return Err("messages: Input should be a valid list".into()),
    }
    let max_tokens = match (endpoint, object.get("max_tokens")) {
        (Endpoint::CountTokens, _) => 0,
        (Endpoint::Messages, None) => return Err("max_tokens: Field required".into()),
        (Endpoint::Messages, Some(v)) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => {
                return Err(
                    "max_tokens: Input should be an integer greater than or equal to 1".into(),
                );
            }
        },
    };
    let stream = match object.get("stream") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err("stream: Input should be a valid boolean".into()),
    };
    let meta = RequestMeta::scan(bytes).map_err(|e| e.to_string())?;
    Ok(Parsed {
        model,
        max_tokens,
        stream,
        input_tokens: meta.input_tokens,
        cache_breakpoints: meta.cache_breakpoints,
    })
}

/// What the admission step decided.
enum Decision {
    Reject(Reply),
    Admit {
        flight: Flight,
        output_tokens: u64,
        midstream_error: bool,
        cache: CacheSplit,
    },
}

fn overloaded() -> ApiError {
    ApiError::new(ApiErrorKind::Overloaded, "Overloaded")
}

fn server_error() -> ApiError {
    ApiError::new(ApiErrorKind::Api, "Internal server error")
}

fn spend_cap() -> ApiError {
    ApiError::new(
        ApiErrorKind::SpendLimit,
        "You have reached your specified API usage limits. You will regain access on the first \
         of next month.",
    )
    .with_error_code("enforced_spend_limit_reached")
}

fn rate_limited(retry_after: Duration, message: String) -> Reply {
    let mut reply = Reply::error(&ApiError::new(ApiErrorKind::RateLimit, message));
    reply
        .headers
        .insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry_after)));
    reply
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

async fn messages(shared: &Arc<Shared>, seq: u64, key: KeyId, parsed: Parsed) -> Reply {
    let config = &shared.config;
    let group = config.catalog.group(&parsed.model);
    let limits = config.limits_for(&group);
    let now = Instant::now();
    let mut headers = HeaderMap::new();

    let decision = {
        let mut inner = shared.lock();
        let limits = inner.limits_override.unwrap_or(limits);
        let scripted = inner.faults.pop_front();
        // Two draws per request that reaches this point, whatever the outcome, so that the
        // fault sequence depends only on the seed and the sequence of requests.
        let draw_error = inner.rng.f64();
        let draw_midstream = inner.rng.f64();
        let random_midstream = draw_midstream < config.midstream_error_rate;
        let midstream = match &scripted {
            Some(Fault::MidStreamError) => true,
            Some(_) => false,
            None => random_midstream,
        };
        let in_flight_full = config
            .max_in_flight
            .is_some_and(|max| inner.stats.in_flight >= max);

        let had_scripted = scripted.is_some();
        let early: Option<Reply> = match scripted {
            Some(Fault::Overloaded) => Some(Reply::error(&overloaded())),
            Some(Fault::ServerError) => Some(Reply::error(&server_error())),
            Some(Fault::RateLimited { retry_after }) => {
                inner.stats.rate_limited += 1;
                Some(rate_limited(
                    retry_after,
                    "This request would exceed your rate limit (scripted).".into(),
                ))
            }
            Some(Fault::SpendCap) => Some(Reply::error(&spend_cap())),
            Some(Fault::SpendCapMessage) => Some(Reply::error(&ApiError::new(
                ApiErrorKind::RateLimit,
                "This request would exceed your account's monthly spend limit. Raise the limit \
                 in the Console to continue.",
            ))),
            Some(Fault::UsageLimitReached) => Some(Reply::error(&ApiError::new(
                ApiErrorKind::InvalidRequest,
                "You have reached your specified API usage limits. You will regain access on \
                 the first of next month.",
            ))),
            Some(Fault::Status(code)) => {
                let status = StatusCode::from_u16(code)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let error = ApiError::new(
                    ApiErrorKind::from_status(status),
                    format!("Scripted error {}", status.as_u16()),
                );
                Some(Reply::error_with_status(status, &error))
            }
            Some(Fault::MidStreamError) if !parsed.stream => Some(Reply::error(&overloaded())),
            Some(Fault::MidStreamError) | None => None,
        };
        let early = early.or_else(|| {
            if inner.spend_cap {
                Some(Reply::error(&spend_cap()))
            } else if in_flight_full {
                Some(Reply::error(&overloaded()))
            } else if had_scripted {
                None
            } else if draw_error < config.overloaded_rate {
                Some(Reply::error(&overloaded()))
            } else if draw_error < config.overloaded_rate + config.server_error_rate {
                Some(Reply::error(&server_error()))
            } else if random_midstream && !parsed.stream {
                // A mid-stream failure of a request that does not stream: a 529.
                Some(Reply::error(&overloaded()))
            } else {
                None
            }
        });

        let decision = match early {
            Some(reply) => Decision::Reject(reply),
            None => admit(
                shared, &mut inner, &key, &group, limits, &parsed, midstream, now,
            ),
        };
        inner
            .buckets(&key, &group, limits, now)
            .write_headers(&shared.clock, now, &mut headers);
        decision
    };

    let mut reply = match decision {
        Decision::Reject(reply) => reply,
        Decision::Admit {
            flight,
            output_tokens,
            midstream_error,
            cache,
        } => {
            answer(
                shared,
                seq,
                &parsed,
                flight,
                (output_tokens, cache),
                midstream_error,
                now,
            )
            .await
        }
    };
    for (name, value) in &headers {
        reply.headers.insert(name.clone(), value.clone());
    }
    reply
}

/// The rate-limit check: takes from all three buckets, or from none.
#[allow(clippy::too_many_arguments)]
fn admit(
    shared: &Arc<Shared>,
    inner: &mut super::state::Inner,
    key: &KeyId,
    group: &RateLimitGroup,
    limits: super::MockLimits,
    parsed: &Parsed,
    midstream: bool,
    now: Instant,
) -> Decision {
    let output_tokens = parsed.max_tokens.min(shared.config.output_tokens);
    // Output is reserved from `max_tokens`, capped at the bucket's capacity so that a large
    // `max_tokens` (common) can still be admitted.
    let reserve = parsed.max_tokens.min(limits.otpm);
    let reads_count = shared.config.catalog.cache_reads_count(&parsed.model);
    let (cache, marks) = cache_split(inner, key, parsed, reads_count, now);
    let buckets = inner.buckets(key, group, limits, now);
    let checks = [
        (buckets.requests.time_until(1, now), limits.rpm, "requests"),
        (
            buckets.input.time_until(cache.counted, now),
            limits.itpm,
            "input tokens",
        ),
        (
            buckets.output.time_until(reserve, now),
            limits.otpm,
            "output tokens",
        ),
    ];
    let mut worst: Option<(Duration, u64, &str)> = None;
    for (wait, limit, what) in checks {
        let wait = match wait {
            Some(w) if w.is_zero() => continue,
            Some(w) => w,
            // Larger than the bucket: never admissible. Announce a full refill period.
            None => Duration::from_secs(60),
        };
        if worst.is_none_or(|(w, _, _)| wait > w) {
            worst = Some((wait, limit, what));
        }
    }
    if let Some(accel) = &shared.config.acceleration {
        buckets.trim_admitted(accel, now);
        let bucket_wait = worst.map_or(Duration::ZERO, |(w, _, _)| w);
        let blocked_now = !buckets.accel_allows(accel, limits.rpm, now);
        // The truthful wait: the first whole second at which the buckets hold enough *and*
        // the acceleration ceiling allows one more request.
        let wait = if blocked_now || !bucket_wait.is_zero() {
            buckets.accel_wait(accel, limits.rpm, now, bucket_wait)
        } else {
            Duration::ZERO
        };
        if wait > Duration::from_secs(ceil_secs(bucket_wait)) {
            inner.stats.rate_limited += 1;
            inner.stats.acceleration_limited += 1;
            return Decision::Reject(rate_limited(
                wait,
                format!(
                    "This request would exceed your organization's acceleration limit for the \
                     {group} model group: usage rose too sharply. Please ramp up traffic \
                     gradually and retry later."
                ),
            ));
        }
    }
    if let Some((wait, limit, what)) = worst {
        inner.stats.rate_limited += 1;
        return Decision::Reject(rate_limited(
            wait,
            format!(
                "This request would exceed your organization's rate limit of {limit} {what} \
                 per minute for the {group} model group. Please retry later."
            ),
        ));
    }
    // Every bucket was just checked to hold enough at `now`.
    buckets.requests.force_take(1, now);
    buckets.input.force_take(cache.counted, now);
    buckets.output.force_take(reserve, now);
    if shared.config.acceleration.is_some() {
        buckets.admitted.push_back(now);
    }
    inner.stats.accepted += 1;
    let group_name = group.as_str();
    *inner
        .stats
        .input_tokens
        .entry(group_name.to_owned())
        .or_insert(0) += cache.counted;
    // The cache counters appear only once the prompt cache is used.
    for (map, n) in [
        (&mut inner.stats.cache_read_tokens, cache.read),
        (&mut inner.stats.cache_write_tokens, cache.write),
    ] {
        if n > 0 {
            *map.entry(group_name.to_owned()).or_insert(0) += n;
        }
    }
    if inner.prompt_cache.len() >= PROMPT_CACHE_SWEEP {
        inner.prompt_cache.retain(|_, &mut t| t > now);
    }
    for (id, ttl) in marks {
        inner.prompt_cache.insert(id, now + ttl);
    }
    let flight = Flight::start(shared.clone(), inner, key.clone(), group.clone(), reserve);
    Decision::Admit {
        flight,
        output_tokens,
        midstream_error: midstream && parsed.stream,
        cache,
    }
}

/// The 200 answer of an admitted request: a JSON body after the whole latency, or a paced SSE
/// stream.
async fn answer(
    shared: &Arc<Shared>,
    seq: u64,
    parsed: &Parsed,
    flight: Flight,
    (output_tokens, cache): (u64, CacheSplit),
    midstream_error: bool,
    admitted: Instant,
) -> Reply {
    let config = &shared.config;
    let id = render::make_id("msg_", config.seed, seq, render::SALT_MESSAGE_ID);
    let stop_reason = if config.output_tokens > parsed.max_tokens {
        "max_tokens"
    } else {
        "end_turn"
    };
    let answer = Answer {
        id: &id,
        model: &parsed.model,
        input_tokens: cache.uncached,
        output_tokens,
        stop_reason,
        cache: (cache.write, cache.read),
        cache_1h: cache.write_1h,
    };
    let pieces = render::text_pieces(seq, output_tokens);
    let per_token = config.per_token_latency;
    let first_at = admitted + config.base_latency;
    let done_at =
        first_at + per_token.saturating_mul(u32::try_from(output_tokens).unwrap_or(u32::MAX));
    let mut headers = HeaderMap::new();

    if !parsed.stream {
        if done_at > Instant::now() {
            tokio::time::sleep_until(done_at).await;
        }
        let text: String = pieces.iter().map(|(piece, _)| piece.as_str()).collect();
        let data = render::message_json(&answer, &text);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Reply {
            status: StatusCode::OK,
            headers,
            body: MockBody::answer(data, output_tokens, flight),
        };
    }

    let mut chunks = VecDeque::new();
    let mut push =
        |at: Instant, data: Bytes, tokens: u64| chunks.push_back(Chunk { at, data, tokens });
    push(first_at, render::sse_message_start(&answer), 0);
    push(first_at, render::sse_content_block_start(), 0);
    push(first_at, render::sse_ping(), 0);
    let mut sent = 0u64;
    for (piece, tokens) in &pieces {
        sent += tokens;
        let at = first_at + per_token.saturating_mul(u32::try_from(sent).unwrap_or(u32::MAX));
        push(at, render::sse_text_delta(piece), sent);
        if midstream_error {
            break;
        }
    }
    if midstream_error {
        let at = first_at + per_token.saturating_mul(u32::try_from(sent + 1).unwrap_or(u32::MAX));
        push(at, render::sse_error(&overloaded().to_envelope()), sent);
    } else {
        push(done_at, render::sse_content_block_stop(), sent);
        push(done_at, render::sse_message_delta(&answer), sent);
        push(done_at, render::sse_message_stop(), sent);
    }
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Reply {
        status: StatusCode::OK,
        headers,
        body: MockBody::paced(chunks, flight),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + 'static>() {}

    #[test]
    fn simulator_types_are_send_and_sync() {
        assert_send_sync::<MockClaude>();
        assert_send_sync::<MockBody>();
        fn assert_send<T: Send + 'static>() {}
        assert_send::<ResponseFuture>();
    }

    #[test]
    fn api_key_from_either_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(api_key(&headers), None);
        headers.insert("authorization", HeaderValue::from_static("Bearer  sk-1 "));
        assert_eq!(api_key(&headers), Some("sk-1"));
        headers.insert("authorization", HeaderValue::from_static("Basic sk-1"));
        assert_eq!(api_key(&headers), None);
        headers.insert("x-api-key", HeaderValue::from_static("sk-2"));
        assert_eq!(api_key(&headers), Some("sk-2"));
        headers.insert("x-api-key", HeaderValue::from_static("  "));
        assert_eq!(api_key(&headers), None);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(20)), 20);
        assert_eq!(ceil_secs(Duration::from_millis(20_001)), 21);
        assert_eq!(ceil_secs(Duration::ZERO), 0);
    }
}
