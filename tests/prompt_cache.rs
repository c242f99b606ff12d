//! Prompt caching and the quota: the cache-aware input estimate (first sightings, repeats,
//! expiry, the 1-hour TTL), an agent loop whose cached prefix exceeds the input limit, the
//! bounded prefix memory, the simulator's prompt cache, spend caps in every shape, and cache
//! tokens on the status data.
#![cfg(feature = "testing")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{KeyId, RateLimitGroup, RequestMeta, Usage};
use tower_claude::body::RequestBody;
use tower_claude::key_pool::{KeyPoolLayer, KeyState, RemovalReason};
use tower_claude::quota::{AcquireError, AcquireErrorKind, Limits, PromptCacheMemory, QuotaBoard};
use tower_claude::rate_limit::RateLimitLayer;
use tower_claude::retry::{RetryError, RetryErrorKind, RetryLayer};
use tower_claude::testing::{Fault, MockClaude, MockLimits};

const API_KEY: &str = "sk-ant-agent";
const MODEL: &str = "claude-sonnet-4-6";

fn group() -> RateLimitGroup {
    RateLimitGroup::new("claude-sonnet-4")
}

fn key() -> KeyId {
    KeyId::from_api_key(API_KEY)
}

/// Text the estimate counts as `tokens` tokens (three ASCII bytes per token), tagged so that
/// different tags make different prefixes.
fn text(tag: &str, tokens: usize) -> String {
    let mut s = format!("{tag}: ");
    while s.len() < tokens * 3 {
        s.push_str("lorem ipsum dolor sit amet ");
    }
    s.truncate(tokens * 3);
    s
}

fn cached_block(text: &str, ttl: &str) -> String {
    format!(r#"{{"type":"text","text":"{text}","cache_control":{{"type":"ephemeral"{ttl}}}}}"#)
}

/// A request: a cached system prompt, then optionally a cached document in the first user
/// message, then the question (not cached).
fn body(system: &str, ttl: &str, doc: Option<&str>, question: &str) -> String {
    let doc = doc.map_or(String::new(), |d| format!("{},", cached_block(d, "")));
    format!(
        r#"{{"model":"{MODEL}","max_tokens":200,"system":[{}],"messages":[{{"role":"user","content":[{doc}{{"type":"text","text":"{question}"}}]}}]}}"#,
        cached_block(system, ttl)
    )
}

fn request(body: String) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

async fn usage_of<B>(res: Response<B>) -> Usage
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Usage::from_json(&bytes).expect("usage")
}

fn mock(itpm: u64) -> MockClaude {
    MockClaude::builder()
        .limits(MODEL, MockLimits::new(1_000, itpm, 400_000))
        .latency(Duration::from_secs(1), Duration::ZERO)
        .output_tokens(50)
        .build()
}

/// Runs the agent loop: call 1 sends the 60k-token system prompt (cached for 1 h); calls
/// 2..=50 add a 60k-token document (cached) in the first user message, so calls 3..=50 carry
/// a 120k-token cached prefix, over an input limit of 80k per minute.
async fn agent_loop<S, B>(svc: &mut S, calls: usize) -> Result<Vec<Usage>, BoxError>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let system = text("system", 60_000);
    let doc = text("document", 60_000);
    let mut usages = Vec::new();
    for i in 1..=calls {
        let question = format!("step {i}: what next?");
        let body = if i == 1 {
            body(&system, r#","ttl":"1h""#, None, &question)
        } else {
            body(&system, r#","ttl":"1h""#, Some(&doc), &question)
        };
        let res = svc.ready().await?.call(request(body)).await?;
        usages.push(usage_of(res).await);
    }
    Ok(usages)
}

#[tokio::test(start_paused = true)]
async fn an_agent_loop_with_a_cached_prefix_over_the_input_limit_runs_at_the_servers_pace() {
    let mock = mock(80_000);
    let layer = RateLimitLayer::new().limits(group(), Limits::new(1_000, 80_000, 400_000));
    let board = layer.quota_board().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(mock.clone());

    let start = Instant::now();
    let usages = agent_loop(&mut svc, 50)
        .await
        .expect("no call refused locally");
    let elapsed = start.elapsed();

    let stats = mock.stats();
    assert_eq!(stats.accepted, 50);
    assert_eq!(stats.rate_limited, 0, "no upstream 429");
    // The server counted the two cache writes and the uncached tails; 48 calls read 120k.
    assert!(usages[0].cache_creation_input_tokens >= 60_000);
    assert!(usages[1].cache_read_input_tokens >= 60_000);
    assert!(usages[1].cache_creation_input_tokens >= 60_000);
    for u in &usages[2..] {
        assert!(u.cache_read_input_tokens >= 120_000, "{u:?}");
        assert_eq!(u.cache_creation_input_tokens, 0);
    }
    // The time the server's counting allows: what it counted beyond one full bucket, at
    // 80k per minute, plus one second of latency per call.
    let counted = stats.input_tokens["claude-sonnet-4"];
    let refill = Duration::from_secs_f64(counted.saturating_sub(80_000) as f64 * 60.0 / 80_000.0);
    let allowed = refill + Duration::from_secs(50);
    eprintln!(
        "agent loop: 50 calls in {elapsed:?}; the server counted {counted} input tokens, allowing {allowed:?}"
    );
    assert!(
        elapsed <= allowed + Duration::from_secs(2),
        "took {elapsed:?}, the server allows {allowed:?}"
    );
    // The board saw the cache tokens.
    let status = board.statuses().into_iter().next().unwrap();
    let cache = status.prompt_cache.expect("cache totals");
    assert!(cache.read_tokens >= 48 * 120_000);
    assert!(cache.write_tokens >= 120_000);
    assert!(cache.hit_ratio() > 0.9, "{cache:?}");
}

/// Issues 12 and 17 together: behind a key pool sharing the board, the pool admits the request
/// (takes its quota) before the rate limiter sees it; the admission reserves the cache-aware
/// estimate of each key too, so the agent loop is neither refused nor held back there.
#[tokio::test(start_paused = true)]
async fn a_key_pool_admits_the_agent_loop_by_the_cache_aware_estimate() {
    let mock = mock(80_000);
    let layer = RateLimitLayer::new().limits(group(), Limits::new(1_000, 80_000, 400_000));
    let board = layer.quota_board().clone();
    let pool = KeyPoolLayer::new([API_KEY]).unwrap().board(board.clone());
    let mut svc = ServiceBuilder::new()
        .layer(pool)
        .layer(layer)
        .service(mock.clone());

    let start = Instant::now();
    let usages = agent_loop(&mut svc, 20)
        .await
        .expect("no call refused by the pool's admission");
    let elapsed = start.elapsed();
    let stats = mock.stats();
    assert_eq!(stats.accepted, 20);
    assert_eq!(stats.rate_limited, 0, "no upstream 429");
    for u in &usages[2..] {
        assert!(u.cache_read_input_tokens >= 120_000, "{u:?}");
    }
    let counted = stats.input_tokens["claude-sonnet-4"];
    let refill = Duration::from_secs_f64(counted.saturating_sub(80_000) as f64 * 60.0 / 80_000.0);
    let allowed = refill + Duration::from_secs(20);
    assert!(
        elapsed <= allowed + Duration::from_secs(2),
        "took {elapsed:?}, the server allows {allowed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_whole_prompt_estimate_refuses_the_same_agent_loop() {
    // What the stack did before the estimate knew the prompt cache: the second call counts
    // 120k input tokens against 80k per minute and is refused locally as too large.
    let mock = mock(80_000);
    let layer = RateLimitLayer::new()
        .limits(group(), Limits::new(1_000, 80_000, 400_000))
        .cache_aware(false);
    let mut svc = ServiceBuilder::new().layer(layer).service(mock.clone());
    let err = agent_loop(&mut svc, 50).await.unwrap_err();
    let err = err.downcast_ref::<AcquireError>().expect("AcquireError");
    assert_eq!(err.kind(), AcquireErrorKind::RequestTooLarge);
    let (cost, limits) = err.sizes().expect("the numbers");
    assert!(cost.input_tokens > 120_000, "{cost:?}");
    assert_eq!(limits.itpm, 80_000);
    assert!(
        err.to_string()
            .contains("input tokens counted (limit 80000)"),
        "{err}"
    );
    assert_eq!(mock.stats().accepted, 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_counted_input_exceeds_the_limit_is_refused_with_the_numbers() {
    // A first sighting of a 90k-token prefix counts in full: it truly cannot fit 80k.
    let mock = mock(80_000);
    let layer = RateLimitLayer::new().limits(group(), Limits::new(1_000, 80_000, 400_000));
    let mut svc = ServiceBuilder::new().layer(layer).service(mock.clone());
    let big = text("big", 90_000);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(body(&big, "", None, "hi")))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<AcquireError>().expect("AcquireError");
    assert_eq!(err.kind(), AcquireErrorKind::RequestTooLarge);
    let (cost, limits) = err.sizes().unwrap();
    assert!(cost.input_tokens >= 90_000 && limits.itpm == 80_000);
    assert_eq!(mock.stats().received, 0);
}

/// The same refusal when a key pool sharing the board admits the request (issue 12): the
/// pool's error carries the numbers too.
#[tokio::test(start_paused = true)]
async fn a_key_pool_refuses_a_counted_input_over_the_limit_with_the_numbers() {
    let mock = mock(80_000);
    let layer = RateLimitLayer::new().limits(group(), Limits::new(1_000, 80_000, 400_000));
    let pool = KeyPoolLayer::new([API_KEY])
        .unwrap()
        .board(layer.quota_board().clone());
    let mut svc = ServiceBuilder::new()
        .layer(pool)
        .layer(layer)
        .service(mock.clone());
    let big = text("big", 90_000);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(body(&big, "", None, "hi")))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<AcquireError>().expect("AcquireError");
    assert_eq!(err.kind(), AcquireErrorKind::RequestTooLarge);
    let (cost, limits) = err.sizes().expect("sizes");
    assert!(cost.input_tokens >= 90_000 && limits.itpm == 80_000);
    assert_eq!(mock.stats().received, 0);
}

/// A rate-limited service over `mock` that pushes to `reserved` the input tokens each request
/// reserved (the input bucket is full before each request; its level is read at the call).
fn spying(
    mock: MockClaude,
    itpm: u64,
    reserved: Arc<Mutex<Vec<u64>>>,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = BoxError>>,
    Error = BoxError,
> {
    let layer = RateLimitLayer::new().limits(group(), Limits::new(1_000, itpm, 400_000));
    let board = layer.quota_board().clone();
    let inner = tower::service_fn(move |req: Request<RequestBody>| {
        let remaining = board
            .headroom(&key(), &group())
            .and_then(|h| h.input_tokens)
            .map_or(0, |b| b.remaining);
        reserved.lock().unwrap().push(itpm - remaining);
        mock.clone().oneshot(req)
    });
    ServiceBuilder::new().layer(layer).service(inner)
}

#[tokio::test(start_paused = true)]
async fn first_sightings_and_expired_prefixes_count_in_full_repeats_only_what_counts() {
    let mock = mock(1_000_000);
    let reserved = Arc::new(Mutex::new(Vec::new()));
    let mut svc = spying(mock.clone(), 1_000_000, reserved.clone());
    let short = text("five-minute prefix", 5_000);
    let long = text("one-hour prefix", 5_000);
    let full = |b: &str| RequestMeta::scan(b.as_bytes()).unwrap().input_tokens;
    let prefix = |b: &str| RequestMeta::scan(b.as_bytes()).unwrap().cache_breakpoints[0].tokens;

    let mut send = async |body: String| {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(request(body))
            .await
            .unwrap();
        let usage = usage_of(res).await;
        // Let every bucket fill up again before the next request.
        tokio::time::advance(Duration::from_secs(120)).await;
        (reserved.lock().unwrap().last().copied().unwrap(), usage)
    };

    let a = body(&short, "", None, "first");
    let b = body(&short, "", None, "second question");
    // First sighting: the whole estimate, a cache write.
    let (r, u) = send(a.clone()).await;
    assert_eq!(r, full(&a));
    assert!(u.cache_creation_input_tokens >= 5_000 && u.cache_read_input_tokens == 0);
    // Within the TTL (2 minutes later): only the part after the breakpoint.
    let (r, u) = send(b.clone()).await;
    assert_eq!(r, full(&b) - prefix(&b));
    assert_eq!(u.cache_read_input_tokens, prefix(&b));
    // Past the 5-minute TTL: a first sighting again.
    tokio::time::advance(Duration::from_secs(301)).await;
    let (r, u) = send(a.clone()).await;
    assert_eq!(r, full(&a));
    assert_eq!(u.cache_read_input_tokens, 0);

    // "ttl":"1h": still cached after 6 minutes, not after an hour.
    let c = body(&long, r#","ttl":"1h""#, None, "one");
    let (r, _) = send(c.clone()).await;
    assert_eq!(r, full(&c));
    tokio::time::advance(Duration::from_secs(360)).await;
    let (r, u) = send(c.clone()).await;
    assert_eq!(r, full(&c) - prefix(&c));
    assert_eq!(u.cache_read_input_tokens, prefix(&c));
    tokio::time::advance(Duration::from_secs(3_601)).await;
    let (r, _) = send(c.clone()).await;
    assert_eq!(r, full(&c));

    assert_eq!(mock.stats().rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn prefixes_are_remembered_per_key_and_model() {
    let memory = PromptCacheMemory::new(100);
    let system = text("shared", 3_000);
    let sonnet = RequestMeta::scan(body(&system, "", None, "q").as_bytes()).unwrap();
    let opus_body = body(&system, "", None, "q").replace(MODEL, "claude-opus-4-7");
    let opus = RequestMeta::scan(opus_body.as_bytes()).unwrap();
    let (a, b) = (KeyId::named("a"), KeyId::named("b"));
    memory.remember(&memory.estimate(&a, &sonnet, false));
    assert!(memory.estimate(&a, &sonnet, false).expected_read_tokens() > 0);
    assert_eq!(
        memory.estimate(&b, &sonnet, false).expected_read_tokens(),
        0
    );
    assert_eq!(memory.estimate(&a, &opus, false).expected_read_tokens(), 0);
    // A model whose cache reads count reserves everything even when the prefix is cached.
    let counted = memory.estimate(&a, &sonnet, true);
    assert_eq!(counted.counted_input_tokens(), sonnet.input_tokens);
}

/// Resident memory of this process, in bytes (Linux).
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::test(start_paused = true)]
async fn the_prefix_memory_is_bounded() {
    const N: u64 = 100_000;
    let memory = PromptCacheMemory::new(N);
    let meta = RequestMeta::scan(body(&text("memory", 2_000), "", None, "q").as_bytes()).unwrap();
    let before = rss();
    // One prefix per key: 100,000 distinct remembered prefixes.
    for i in 0..N {
        let key = KeyId::named(&format!("tenant-{i}"));
        memory.remember(&memory.estimate(&key, &meta, false));
    }
    let len = memory.len();
    assert!(len > N * 9 / 10 && len <= N, "{len}");
    if let (Some(before), Some(after)) = (before, rss()) {
        let grown = after.saturating_sub(before);
        eprintln!(
            "prompt cache memory: {len} prefixes, RSS grew by {:.1} MB ({} bytes per prefix)",
            grown as f64 / 1e6,
            grown / len
        );
        assert!(
            grown < 64 << 20,
            "RSS grew by {grown} bytes for {len} prefixes"
        );
    }
    // Twice as many: still at most the capacity, the oldest forgotten.
    for i in N..2 * N {
        let key = KeyId::named(&format!("tenant-{i}"));
        memory.remember(&memory.estimate(&key, &meta, false));
    }
    assert!(memory.len() <= N);
    let newest = KeyId::named(&format!("tenant-{}", 2 * N - 1));
    assert!(
        memory
            .estimate(&newest, &meta, false)
            .expected_read_tokens()
            > 0
    );
}

/// One request through retry and a pool of one key; the spend cap in `fault`'s shape.
async fn spend_cap_through_the_stack(fault: Fault) {
    let mock = MockClaude::builder().build();
    let pool = KeyPoolLayer::new([API_KEY]).unwrap();
    let handle = pool.handle();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(pool)
        .layer(RateLimitLayer::new())
        .service(mock.clone());
    mock.push_fault(fault.clone());
    let req = Request::post("https://api.anthropic.com/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(format!(
            r#"{{"model":"{MODEL}","max_tokens":10,"messages":[{{"role":"user","content":"hi"}}]}}"#
        )))
        .unwrap();
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    let err = err.downcast_ref::<RetryError>().expect("RetryError");
    assert_eq!(err.kind(), RetryErrorKind::SpendLimit, "{fault:?}: {err}");
    assert_eq!(mock.stats().received, 1, "{fault:?} was retried");
    assert!(
        matches!(
            handle.status(&key()).unwrap().state,
            KeyState::Removed {
                reason: RemovalReason::SpendCap,
                ..
            }
        ),
        "{fault:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_spend_cap_by_error_code_is_final_and_removes_the_key() {
    spend_cap_through_the_stack(Fault::SpendCap).await;
}

#[tokio::test(start_paused = true)]
async fn a_429_saying_the_monthly_spend_limit_is_final_and_removes_the_key() {
    spend_cap_through_the_stack(Fault::SpendCapMessage).await;
}

#[tokio::test(start_paused = true)]
async fn a_400_saying_the_usage_limits_are_reached_is_final_and_removes_the_key() {
    spend_cap_through_the_stack(Fault::UsageLimitReached).await;
}

#[tokio::test(start_paused = true)]
async fn the_agent_loop_through_claude_stack_stays_on_its_model() {
    use tower_claude::stack::ClaudeStack;
    let mock = mock(80_000);
    let board = QuotaBoard::builder()
        .limits(group(), Limits::new(1_000, 80_000, 400_000))
        .build();
    let stack = ClaudeStack::new().board(board.clone());
    let svc = stack.service(mock.clone());
    let system = text("system", 60_000);
    let doc = text("document", 60_000);
    for i in 1..=10 {
        // A minute between calls: the bucket is full again, so the counted estimate fits
        // (the whole prompt, 120k tokens, never fits 80k).
        tokio::time::advance(Duration::from_secs(60)).await;
        let question = format!("step {i}");
        let body = if i == 1 {
            body(&system, "", None, &question)
        } else {
            body(&system, "", Some(&doc), &question)
        };
        let res = svc.clone().oneshot(request(body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "call {i}");
        // Fallback judged the requested model by the counted estimate: no move to another.
        assert_eq!(res.headers()["x-tower-claude-model"], MODEL, "call {i}");
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(mock.stats().rate_limited, 0);
}
