//! Budgets per tenant (`tenant::budget::BudgetLayer`): a budget stops a tenant within one
//! request's cost (cache writes and reads priced), concurrent requests stay within that bound,
//! the tenant resumes in the next period, spend survives a restart (redb) and is shared across
//! two stacks (Redis), streams are priced, a failing store never fails a request, and the 80 %
//! alert fires once per period.
#![cfg(feature = "testing")]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{BodyState, RequestMeta, StreamTracker, Usage, UsageTracker};
use tower_claude::body::RequestBody;
use tower_claude::tenant::budget::BudgetLayer;
use tower_claude::tenant::spend::{
    MemorySpend, Period, SpendError, SpendErrorKind, SpendFuture, SpendKey, SpendStore,
};
use tower_claude::tenant::{Budget, PriceTable, Tenant};
use tower_claude::testing::MockClaude;

const SONNET: &str = "claude-sonnet-4-6";
const HAIKU: &str = "claude-haiku-4-5";
/// 2099-12-05 12:00:00 UTC. Far ahead on purpose: the stores expire a key by the real clock
/// a day after its period ends (Redis `EXPIREAT`, the disk and memory sweeps), so a date that
/// has passed would have the key forgotten as soon as it is written.
const DEC_5_NOON: u64 = 4_100_155_200;
/// 2099-12-30 18:00:00 UTC.
const DEC_30_EVENING: u64 = 4_102_336_800;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<Mutex<SystemTime>>);

impl TestClock {
    fn new(t: SystemTime) -> Self {
        Self(Arc::new(Mutex::new(t)))
    }

    fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap() = t;
    }

    fn as_fn(&self) -> impl Fn() -> SystemTime + Send + Sync + 'static {
        let c = self.0.clone();
        move || *c.lock().unwrap()
    }
}

/// Text the request estimate counts as about `tokens` tokens.
fn text(tag: &str, tokens: usize) -> String {
    let mut s = format!("{tag}: ");
    while s.len() < tokens * 3 {
        s.push_str("lorem ipsum dolor sit amet ");
    }
    s.truncate(tokens * 3);
    s
}

/// A request with a 2,000-token system prompt marked for the prompt cache.
fn cached_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":200,"stream":{stream},"system":[{{"type":"text","text":"{}","cache_control":{{"type":"ephemeral"}}}}],"messages":[{{"role":"user","content":"What next?"}}]}}"#,
        text("system", 2_000)
    )
}

fn plain_body(model: &str, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hello there"}}]}}"#
    )
}

fn ask(tenant: &Tenant, body: &str) -> Request<RequestBody> {
    let mut req = Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body.to_owned()))
        .unwrap();
    req.extensions_mut().insert(tenant.clone());
    req
}

/// Calls `svc` and reads the whole answer (its cost settles when the body ends).
async fn call<S, B>(svc: &S, req: Request<RequestBody>) -> (StatusCode, HeaderMap, Bytes)
where
    S: Service<Request<RequestBody>, Response = http::Response<B>, Error = BoxError> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

/// Lets the spawned store adds run.
async fn settle_tasks() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Cost in micro-USD at explicit per-MTok prices (input, 5 min write, 1 h write, read, output),
/// rounded up once.
fn priced(u: &Usage, p: [u64; 5]) -> u64 {
    let n = u128::from(u.input_tokens) * u128::from(p[0])
        + u128::from(u.cache_creation_5m_input_tokens()) * u128::from(p[1])
        + u128::from(u.cache_creation_1h_input_tokens) * u128::from(p[2])
        + u128::from(u.cache_read_input_tokens) * u128::from(p[3])
        + u128::from(u.output_tokens) * u128::from(p[4]);
    u64::try_from(n.div_ceil(1_000_000)).unwrap()
}

/// Sonnet 4.6 on Anthropic's pricing page: $3, $3.75, $6, $0.30, $15 per MTok.
const SONNET_PRICES: [u64; 5] = [3_000_000, 3_750_000, 6_000_000, 300_000, 15_000_000];
/// Haiku 4.5: $1, $1.25, $2, $0.10, $5 per MTok.
const HAIKU_PRICES: [u64; 5] = [1_000_000, 1_250_000, 2_000_000, 100_000, 5_000_000];

fn micro(t: &Tenant) -> u64 {
    (t.stats().cost_usd() * 1e6).round() as u64
}

fn max_cost(model: &str, body: &str) -> u64 {
    let meta = RequestMeta::scan(body.as_bytes()).unwrap();
    PriceTable::default().max_cost_micro_usd(model, &meta, 4_096)
}

#[tokio::test(start_paused = true)]
async fn a_budget_stops_a_tenant_within_one_request_cost_with_cache_tokens_priced() {
    let clock = TestClock::new(at(DEC_5_NOON));
    let store = MemorySpend::new();
    let mock = MockClaude::builder().output_tokens(100).build();
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(store.clone()).clock(clock.as_fn()))
        .service(mock.clone());
    let budget = 20_000; // $0.02
    let team = Tenant::new("team-a").budget(Budget::default().per_day(0.02));
    let body = cached_body(SONNET, false);

    let mut expected = 0;
    let mut answers = 0;
    let refused = loop {
        let (status, headers, bytes) = call(&svc, ask(&team, &body)).await;
        if status != StatusCode::OK {
            break (status, headers, bytes);
        }
        let usage = Usage::from_json(&bytes).unwrap();
        if answers == 0 {
            // The first request writes the cached prefix, the next ones read it.
            assert!(usage.cache_creation_input_tokens >= 1_024, "{usage:?}");
            assert_eq!(usage.cache_read_input_tokens, 0);
        } else {
            assert!(usage.cache_read_input_tokens >= 1_024, "{usage:?}");
            assert_eq!(usage.cache_creation_input_tokens, 0);
        }
        expected += priced(&usage, SONNET_PRICES);
        answers += 1;
        // Settled at the end of the body, to the micro-dollar.
        assert_eq!(micro(&team), expected);
        assert!(answers < 100, "never stopped");
    };
    assert!(answers >= 3, "{answers}");

    // The refusal: a 429 of the API's shape, not an upstream call.
    let (status, headers, bytes) = refused;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["x-should-retry"], "false");
    assert_eq!(headers["retry-after"], "43200"); // noon to midnight UTC
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "rate_limit_error");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("tenant \"team-a\""), "{message}");
    assert!(message.contains("daily budget of $0.0200"), "{message}");
    assert!(message.contains("2099-12-06T00:00:00Z"), "{message}");
    assert_eq!(mock.stats().received, answers);
    assert_eq!(team.stats().refusals(), 1);

    // Within one request's cost: the spend passed the budget, by less than one reservation.
    assert!(expected >= budget);
    assert!(expected < budget + max_cost(SONNET, &body), "{expected}");
    settle_tasks().await;
    let day = SpendKey::new("team-a", Period::day_of(at(DEC_5_NOON)));
    let month = SpendKey::new("team-a", Period::month_of(at(DEC_5_NOON)));
    assert_eq!(
        store.get(&[day, month]).await.unwrap(),
        [expected, expected]
    );
    // Tokens: every kind of input, and the output.
    assert_eq!(team.stats().output_tokens(), 100 * answers);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_in_flight_stay_within_one_request_cost() {
    let clock = TestClock::new(at(DEC_5_NOON));
    let mock = MockClaude::builder()
        .output_tokens(100)
        .latency(Duration::from_secs(1), Duration::ZERO)
        .build();
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()).clock(clock.as_fn()))
        .service(mock.clone());
    let budget = 20_000;
    let team = Tenant::new("batch").budget(Budget::default().per_day(0.02));
    // Each reserves 1,000 output tokens at $15 (about $0.015) but uses 100 (about $0.0015).
    let body = plain_body(SONNET, 1_000);
    let reserve = max_cost(SONNET, &body);
    assert!(reserve > 15_000);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (svc, req) = (svc.clone(), ask(&team, &body));
        tasks.spawn(async move {
            let (status, headers, _) = call(&svc, req).await;
            (status, headers)
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (status, headers) = result.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(headers["x-should-retry"], "false");
                refused += 1;
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(ok + refused, 40);
    // Reservations let only one or two in at a time; those that waited went in as the others
    // settled, until the settled spend reached the budget.
    assert!(ok > 2, "{ok}");
    assert!(refused > 0);
    assert_eq!(mock.stats().max_in_flight, 2);
    let spent = micro(&team);
    assert!(spent >= budget, "{spent}");
    assert!(spent < budget + reserve, "{spent} overshoots the bound");
    assert_eq!(mock.stats().received, ok);
}

#[tokio::test(start_paused = true)]
async fn the_tenant_resumes_in_the_next_period() {
    let clock = TestClock::new(at(DEC_30_EVENING));
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()).clock(clock.as_fn()))
        .service(MockClaude::builder().output_tokens(100).build());
    let body = plain_body(HAIKU, 100);
    let daily = Tenant::new("daily").budget(Budget::default().per_day(0.0001));
    let monthly = Tenant::new("monthly").budget(Budget::default().per_month(0.0001));
    for t in [&daily, &monthly] {
        // $0.0005 per answer: the first one spends the budget.
        assert_eq!(call(&svc, ask(t, &body)).await.0, StatusCode::OK);
        assert_eq!(
            call(&svc, ask(t, &body)).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    // The next day (still December): the daily budget is fresh, the monthly one is not.
    clock.set(at(DEC_30_EVENING + 86_400));
    assert_eq!(call(&svc, ask(&daily, &body)).await.0, StatusCode::OK);
    let (status, headers, _) = call(&svc, ask(&monthly, &body)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // 2099-12-31 18:00 to 2100-01-01 00:00.
    assert_eq!(headers["retry-after"], "21600");

    // January: both resume.
    clock.set(at(DEC_30_EVENING + 86_400 + 6 * 3_600));
    assert_eq!(call(&svc, ask(&monthly, &body)).await.0, StatusCode::OK);
    assert_eq!(call(&svc, ask(&daily, &body)).await.0, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_answers_usage_is_priced() {
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()))
        .service(MockClaude::builder().output_tokens(120).build());
    let team = Tenant::new("streamer").budget(Budget::default().per_month(100.0));
    let body = cached_body(HAIKU, true);
    let mut expected = 0;
    for _ in 0..2 {
        let (status, headers, bytes) = call(&svc, ask(&team, &body)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let mut tracker = StreamTracker::new();
        tracker.feed(&bytes);
        tracker.finish();
        assert!(tracker.is_complete());
        let usage = tracker.usage();
        assert_eq!(usage.output_tokens, 120);
        assert!(usage.cache_creation_input_tokens + usage.cache_read_input_tokens >= 1_024);
        expected += priced(&usage, HAIKU_PRICES);
        assert_eq!(micro(&team), expected);
    }
}

/// The budget reads the answer's one usage tracker, the one a layer below published, rather
/// than parsing the stream again: here the tracker below says other numbers than the stream,
/// and the budget charges the tracker's (a budget with its own parser charged the stream's).
#[tokio::test(start_paused = true)]
async fn the_budget_settles_from_the_usage_tracker_a_layer_below_published() {
    let below = UsageTracker::new(true, 0);
    below.feed(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    below.end(false);
    let publish = below.clone();
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()))
        .map_response(move |mut res: http::Response<_>| {
            res.extensions_mut().insert(publish.clone());
            res
        })
        .service(MockClaude::builder().output_tokens(120).build());
    let team = Tenant::new("reader").budget(Budget::default().per_month(100.0));
    let (status, _, bytes) = call(&svc, ask(&team, &cached_body(HAIKU, true))).await;
    assert_eq!(status, StatusCode::OK);
    // The stream itself reached the caller untouched (and says 120 output tokens).
    let mut stream = StreamTracker::new();
    stream.feed(&bytes);
    stream.finish();
    assert_eq!(stream.usage().output_tokens, 120);
    let usage = below.usage().unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens), (7, 5));
    assert_eq!(micro(&team), priced(&usage, HAIKU_PRICES));
}

/// Alone, the budget is the layer that reads usage: it publishes the answer's tracker, fed
/// with each byte once, for the layers above.
#[tokio::test(start_paused = true)]
async fn a_budget_alone_publishes_the_answers_usage_tracker() {
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()))
        .service(MockClaude::builder().output_tokens(30).build());
    let team = Tenant::new("alone").budget(Budget::default().per_month(100.0));
    for stream in [true, false] {
        let res = svc
            .clone()
            .oneshot(ask(&team, &cached_body(HAIKU, stream)))
            .await
            .unwrap();
        let tracker = res.extensions().get::<UsageTracker>().unwrap().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(tracker.state(), BodyState::Complete);
        assert_eq!(tracker.is_stream(), stream);
        assert_eq!(tracker.usage().unwrap().output_tokens, 30);
        assert!(format!("{tracker:?}").contains(&format!("seen: {}", bytes.len())));
    }
    // Without a tenant nothing is metered, and nothing is published.
    let mut req = ask(&team, &plain_body(HAIKU, 10));
    req.extensions_mut().remove::<Tenant>();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert!(res.extensions().get::<UsageTracker>().is_none());
}

#[tokio::test(start_paused = true)]
async fn one_hour_cache_writes_from_the_simulator_are_priced_apart() {
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()))
        .service(MockClaude::builder().output_tokens(50).build());
    let team = Tenant::new("hour-mock");
    // A system prompt cached for an hour, then a document cached for 5 minutes.
    let body = format!(
        r#"{{"model":"{SONNET}","max_tokens":100,"system":[{{"type":"text","text":"{}","cache_control":{{"type":"ephemeral","ttl":"1h"}}}}],"messages":[{{"role":"user","content":[{{"type":"text","text":"{}","cache_control":{{"type":"ephemeral"}}}},{{"type":"text","text":"Summarise."}}]}}]}}"#,
        text("system", 2_000),
        text("document", 1_500)
    );
    let (status, _, bytes) = call(&svc, ask(&team, &body)).await;
    assert_eq!(status, StatusCode::OK);
    let usage = Usage::from_json(&bytes).unwrap();
    assert!(usage.cache_creation_1h_input_tokens >= 1_900, "{usage:?}");
    assert!(usage.cache_creation_5m_input_tokens() >= 1_400, "{usage:?}");
    assert_eq!(micro(&team), priced(&usage, SONNET_PRICES));
    // Read back: only the reads are priced (0.1×).
    let (_, _, bytes) = call(&svc, ask(&team, &body)).await;
    let again = Usage::from_json(&bytes).unwrap();
    assert_eq!(again.cache_creation_input_tokens, 0);
    assert_eq!(
        micro(&team),
        priced(&usage, SONNET_PRICES) + priced(&again, SONNET_PRICES)
    );
}

#[tokio::test]
async fn one_hour_cache_writes_are_priced_apart() {
    // The API's `cache_creation` split (MockClaude reports only the total): 1,000 5-minute
    // and 2,000 1-hour writes.
    let upstream = tower::service_fn(|_req: Request<RequestBody>| async {
        let body = r#"{"id":"msg_1","type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":3000,"cache_read_input_tokens":500,"output_tokens":20,"cache_creation":{"ephemeral_5m_input_tokens":1000,"ephemeral_1h_input_tokens":2000}}}"#;
        Ok::<_, BoxError>(
            http::Response::builder()
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from_static(
                    body.as_bytes(),
                )))
                .unwrap(),
        )
    });
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(MemorySpend::new()))
        .service(upstream);
    let team = Tenant::new("hour");
    let (status, _, _) = call(&svc, ask(&team, &plain_body("claude-opus-4-7", 50))).await;
    assert_eq!(status, StatusCode::OK);
    // Opus 4.7: 10 × $5 + 1,000 × $6.25 + 2,000 × $10 + 500 × $0.50 + 20 × $25 per MTok.
    assert_eq!(micro(&team), 50 + 6_250 + 20_000 + 250 + 500);
    assert_eq!(team.stats().input_tokens(), 10 + 3_000 + 500);
}

/// A store that fails while `failing` is set.
#[derive(Debug, Default)]
struct FlakyStore {
    failing: AtomicBool,
    inner: MemorySpend,
}

impl SpendStore for FlakyStore {
    fn get<'a>(&'a self, keys: &'a [SpendKey]) -> SpendFuture<'a, Vec<u64>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(SpendError::new(SpendErrorKind::Backend, "down")) });
        }
        self.inner.get(keys)
    }

    fn add<'a>(&'a self, keys: &'a [SpendKey], micro_usd: u64) -> SpendFuture<'a, Vec<u64>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async { Err(SpendError::new(SpendErrorKind::Timeout, "slow")) });
        }
        self.inner.add(keys, micro_usd)
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_never_fails_a_request_and_catches_up() {
    let clock = TestClock::new(at(DEC_5_NOON));
    let store = Arc::new(FlakyStore::default());
    store.failing.store(true, Ordering::SeqCst);
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::from_arc(store.clone()).clock(clock.as_fn()))
        .service(MockClaude::builder().output_tokens(100).build());
    let body = plain_body(HAIKU, 100);

    // While the store is down, requests go on and their cost is counted in the process.
    let open = Tenant::new("open").budget(Budget::default().per_month(100.0));
    for _ in 0..3 {
        assert_eq!(call(&svc, ask(&open, &body)).await.0, StatusCode::OK);
    }
    settle_tasks().await;
    let keys = [
        SpendKey::new("open", Period::day_of(at(DEC_5_NOON))),
        SpendKey::new("open", Period::month_of(at(DEC_5_NOON))),
    ];
    assert_eq!(store.inner.get(&keys).await.unwrap(), [0, 0]);
    // The budget still holds, from the local count.
    let small = Tenant::new("small").budget(Budget::default().per_day(0.0001));
    assert_eq!(call(&svc, ask(&small, &body)).await.0, StatusCode::OK);
    assert_eq!(
        call(&svc, ask(&small, &body)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Back up: the next settlement adds what was kept.
    store.failing.store(false, Ordering::SeqCst);
    assert_eq!(call(&svc, ask(&open, &body)).await.0, StatusCode::OK);
    settle_tasks().await;
    let spent = micro(&open);
    assert!(spent > 0);
    assert_eq!(store.inner.get(&keys).await.unwrap(), [spent, spent]);
}

#[cfg(feature = "disk-cache")]
#[tokio::test]
async fn spend_survives_a_restart() {
    use tower_claude::tenant::spend::DiskSpend;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spend.redb");
    let clock = TestClock::new(at(DEC_5_NOON));
    let body = plain_body(HAIKU, 100);
    let keys = [SpendKey::new("team", Period::day_of(at(DEC_5_NOON)))];
    let spent = {
        let store = DiskSpend::open(&path).unwrap();
        let svc = ServiceBuilder::new()
            .layer(BudgetLayer::new(store.clone()).clock(clock.as_fn()))
            .service(MockClaude::builder().output_tokens(100).build());
        let team = Tenant::new("team").budget(Budget::default().per_day(0.0001));
        assert_eq!(call(&svc, ask(&team, &body)).await.0, StatusCode::OK);
        let spent = micro(&team);
        // The add runs on a spawned task and the blocking pool: wait for it.
        for _ in 0..500 {
            if store.get(&keys).await.unwrap() == [spent] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.get(&keys).await.unwrap(), [spent]);
        spent
    };
    // A new process: the same file, a fresh layer and tenant.
    let store = DiskSpend::open(&path).unwrap();
    assert_eq!(store.get(&keys).await.unwrap(), [spent]);
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(store).clock(clock.as_fn()))
        .service(MockClaude::builder().output_tokens(100).build());
    let team = Tenant::new("team").budget(Budget::default().per_day(0.0001));
    let (status, _, bytes) = call(&svc, ask(&team, &body)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{bytes:?}");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_spend_is_shared_by_two_stacks() {
    use tower_claude::tenant::spend::RedisSpend;

    let Some(server) = support::redis_server::RedisServer::start() else {
        return;
    };
    let clock = TestClock::new(at(DEC_5_NOON));
    let prefix = "test:spend:";
    let proxy = || async {
        let client = redis::Client::open(server.url()).unwrap();
        let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
        let store = RedisSpend::new(conn, prefix);
        let svc = ServiceBuilder::new()
            .layer(BudgetLayer::new(store.clone()).clock(clock.as_fn()))
            .service(MockClaude::builder().output_tokens(100).build());
        // Each proxy has its own tenant value (from its own tenants file), same name.
        let team = Tenant::new("shared").budget(Budget::default().per_day(0.002));
        (store, svc, team)
    };
    let (store_a, svc_a, team_a) = proxy().await;
    let (store_b, svc_b, team_b) = proxy().await;
    let body = plain_body(HAIKU, 100);
    let keys = [SpendKey::new("shared", Period::day_of(at(DEC_5_NOON)))];
    let mut answers = 0;
    let stopped_at = loop {
        let (svc, team, store) = if answers % 2 == 0 {
            (&svc_a, &team_a, &store_a)
        } else {
            (&svc_b, &team_b, &store_b)
        };
        let (status, _, _) = call(svc, ask(team, &body)).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            break answers;
        }
        assert_eq!(status, StatusCode::OK);
        answers += 1;
        // Wait for the add to reach Redis.
        let total = micro(&team_a) + micro(&team_b);
        for _ in 0..500 {
            if store.get(&keys).await.unwrap() == [total] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store_a.get(&keys).await.unwrap(), [total]);
        assert!(answers < 50, "never stopped");
    };
    // Neither stack alone reached $0.002; together they did, and the other one refuses too.
    let (a, b) = (micro(&team_a), micro(&team_b));
    assert!(a < 2_000 && b < 2_000, "{a} {b}");
    assert!(a + b >= 2_000);
    assert!(stopped_at >= 4);
    let other = if stopped_at % 2 == 0 {
        (&svc_b, &team_b)
    } else {
        (&svc_a, &team_a)
    };
    assert_eq!(
        call(other.0, ask(other.1, &body)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The key names the tenant and the day, never a token.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("test:spend:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        [
            "test:spend:shared:d:2099-12-05",
            "test:spend:shared:m:2099-12"
        ]
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&names[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0);
}

#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn eighty_percent_of_a_budget_alerts_once_per_period() {
    use tower_claude::metrics::alerts::{AlertKind, Alerts};

    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let alerts = Alerts::builder()
        .on_alert(move |a| {
            sink.lock()
                .unwrap()
                .push((a.kind(), a.tenant().map(str::to_owned), a.text()))
        })
        .build();
    let clock = TestClock::new(at(DEC_5_NOON));
    let svc = ServiceBuilder::new()
        .layer(
            BudgetLayer::new(MemorySpend::new())
                .clock(clock.as_fn())
                .alerts(alerts),
        )
        .service(MockClaude::builder().output_tokens(100).build());
    let team = Tenant::new("team-b").budget(Budget::default().per_day(0.004));
    let body = plain_body(HAIKU, 100);
    while call(&svc, ask(&team, &body)).await.0 == StatusCode::OK {
        settle_tasks().await;
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, AlertKind::Budget);
        assert_eq!(seen[0].1.as_deref(), Some("team-b"));
        assert!(seen[0].2.contains("daily budget of $0.00"), "{}", seen[0].2);
        assert!(seen[0].2.contains("2099-12-05"), "{}", seen[0].2);
    }
    // The next day, once more.
    clock.set(at(DEC_5_NOON + 86_400));
    while call(&svc, ask(&team, &body)).await.0 == StatusCode::OK {
        settle_tasks().await;
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[1].2.contains("2099-12-06"), "{}", seen[1].2);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_tenant_or_outside_messages_pass_through_unmetered() {
    let store = MemorySpend::new();
    let mock = MockClaude::builder().output_tokens(10).build();
    let svc = ServiceBuilder::new()
        .layer(BudgetLayer::new(store.clone()))
        .service(mock.clone());
    let mut req = ask(&Tenant::new("x"), &plain_body(HAIKU, 10));
    req.extensions_mut().remove::<Tenant>();
    assert_eq!(call(&svc, req).await.0, StatusCode::OK);
    let broke = Tenant::new("broke").budget(Budget::default().per_day(0.0));
    let mut count = ask(&broke, &plain_body(HAIKU, 10));
    *count.uri_mut() = "/v1/messages/count_tokens".parse().unwrap();
    assert_eq!(call(&svc, count).await.0, StatusCode::OK);
    // A zero budget stops every Messages call.
    assert_eq!(
        call(&svc, ask(&broke, &plain_body(HAIKU, 10))).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(mock.stats().received, 2);
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_runs_out_is_a_429_the_sdks_may_retry() {
    let clock = TestClock::new(at(DEC_5_NOON));
    let layer = BudgetLayer::new(MemorySpend::new())
        .clock(clock.as_fn())
        .max_wait(Duration::from_secs(2));
    let svc = ServiceBuilder::new().layer(layer.clone()).service(
        MockClaude::builder()
            .output_tokens(10)
            .latency(Duration::from_secs(5), Duration::ZERO)
            .build(),
    );
    // One request's reservation (a little over $0.015) fills the $0.015 budget: a second one
    // waits for it, 2 s at most, then gets a 429 with a short retry-after.
    let team = Tenant::new("team").budget(Budget::default().per_day(0.015));
    let body = plain_body(SONNET, 1_000);
    let first = tokio::spawn({
        let (svc, req) = (svc.clone(), ask(&team, &body));
        async move { call(&svc, req).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = tokio::spawn({
        let (svc, req) = (svc.clone(), ask(&team, &body));
        async move { call(&svc, req).await }
    });
    let start = tokio::time::Instant::now();
    let (status, headers, _) = second.await.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    assert!(headers.get("x-should-retry").is_none());
    assert!(
        start.elapsed() >= Duration::from_millis(1_990),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    // Settled: the spend is the real cost, and a new request goes in at once.
    let spend = layer.spend("team").await.unwrap();
    assert_eq!(spend.day, micro(&team));
    assert_eq!(spend.month, micro(&team));
    assert_eq!(call(&svc, ask(&team, &body)).await.0, StatusCode::OK);
}
