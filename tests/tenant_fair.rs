//! Tenants sharing one upstream quota (issue 15): weighted-fair admission in the rate
//! limiter's and the key pool's queues, priority classes, FIFO within a tenant, cancellation,
//! and a tenant's own limits (TenantLimitLayer). MockClaude, paused time.
#![cfg(feature = "testing")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::ModelCatalog;
use tower_claude::body::RequestBody;
use tower_claude::key_pool::KeyPoolLayer;
use tower_claude::quota::{AcquireError, AcquireErrorKind, Limits, QuotaBoard};
use tower_claude::rate_limit::{QueueWait, RateLimitLayer};
use tower_claude::stack::{CacheConfig, ClaudeService, ClaudeStack, StackConfig, boxed};
use tower_claude::tenant::limit::TenantLimitLayer;
use tower_claude::tenant::{Priority, Tenant};
use tower_claude::testing::{MockClaude, MockLimits};

const MODEL: &str = "claude-haiku-4-5";
/// Our limit: one request a second (the admission interval once the bucket is empty).
const RPM: u64 = 60;
const INTERVAL: Duration = Duration::from_secs(1);

/// What the upstream received, in order: (tenant, task number, when).
type Log = Arc<Mutex<Vec<(String, usize, Instant)>>>;

fn mock(keys: &[&str]) -> MockClaude {
    // Roomier than our limit: every wait is ours, no 429.
    MockClaude::builder()
        .default_limits(MockLimits {
            rpm: 10_000,
            itpm: 10_000_000,
            otpm: 10_000_000,
        })
        .api_keys(keys.iter().copied())
        .latency(Duration::from_millis(100), Duration::ZERO)
        .output_tokens(10)
        .build()
}

fn limits() -> Limits {
    Limits::new(RPM, 10_000_000, 10_000_000)
}

fn request(tenant: &Tenant, task: usize) -> Request<RequestBody> {
    let mut req = Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-fair")
        .header("anthropic-version", "2023-06-01")
        .header("x-task", task.to_string())
        .body(RequestBody::from(format!(
            r#"{{"model":"{MODEL}","max_tokens":50,"messages":[{{"role":"user","content":"task {task}"}}]}}"#
        )))
        .unwrap();
    req.extensions_mut().insert(tenant.clone());
    req
}

/// The mock behind a recorder of what reaches it.
fn recorded(mock: MockClaude, log: Log) -> ClaudeService {
    boxed(
        ServiceBuilder::new()
            .map_request(move |req: Request<RequestBody>| {
                let tenant = req
                    .extensions()
                    .get::<Tenant>()
                    .map_or("-".to_owned(), |t| t.name().to_owned());
                let task = req
                    .headers()
                    .get("x-task")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                log.lock().unwrap().push((tenant, task, Instant::now()));
                req
            })
            .service(mock),
    )
}

/// Sends one request and reads its body; returns the time it waited for quota.
async fn send(svc: ClaudeService, req: Request<RequestBody>) -> Result<Duration, BoxError> {
    let res = svc.oneshot(req).await?;
    assert!(res.status().is_success(), "{}", res.status());
    let wait = res
        .extensions()
        .get::<QueueWait>()
        .map_or(Duration::ZERO, |w| w.0);
    res.into_body().collect().await?;
    Ok(wait)
}

/// Spawns `n` requests of `tenant` (tasks `first..first + n`), each enqueued before the next.
async fn flood(
    svc: &ClaudeService,
    tenant: &Tenant,
    first: usize,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<Duration, BoxError>>> {
    let mut handles = Vec::with_capacity(n);
    for task in first..first + n {
        let (svc, req) = (svc.clone(), request(tenant, task));
        handles.push(tokio::spawn(send(svc, req)));
        tokio::task::yield_now().await;
    }
    handles
}

fn rate_limited(log: &Log, keys: &[&str]) -> ClaudeService {
    boxed(
        ServiceBuilder::new()
            .layer(RateLimitLayer::new().default_limits(limits()))
            .service(recorded(mock(keys), log.clone())),
    )
}

/// Counts per tenant among `log[from..to]`.
fn counts(log: &Log, from: usize, to: usize) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for (t, _, _) in &log.lock().unwrap()[from..to] {
        *out.entry(t.clone()).or_default() += 1;
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_tenant_is_not_starved_by_another_ones_backlog() {
    let log = Log::default();
    let svc = rate_limited(&log, &["sk-ant-fair"]);
    let (a, b) = (Tenant::new("a"), Tenant::new("b"));
    let backlog = flood(&svc, &a, 0, 500).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waited = send(svc.clone(), request(&b, 0)).await.unwrap();
    // The first 60 went at once (a full bucket); `b` is admitted at a's next turn's end.
    assert!(waited < 2 * INTERVAL, "b waited {waited:?}");
    assert_eq!(b.stats().queue_wait(), waited);
    for h in backlog.into_iter().take(80) {
        h.await.unwrap().unwrap();
    }
    assert!(a.stats().queue_wait() > Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn weights_three_to_one_under_saturation() {
    let log = Log::default();
    let svc = rate_limited(&log, &["sk-ant-fair"]);
    let (a, b) = (Tenant::new("a").weight(3), Tenant::new("b"));
    let mut handles = flood(&svc, &a, 0, 400).await;
    handles.extend(flood(&svc, &b, 0, 400).await);
    // The bucket's first 60 went in arrival order (all a's); then both are backlogged.
    tokio::time::sleep(Duration::from_secs(205)).await;
    let from = RPM as usize;
    let admitted = counts(&log, from, from + 200);
    let (na, nb) = (admitted["a"] as f64, admitted["b"] as f64);
    let ratio = na / nb;
    assert!((ratio - 3.0).abs() <= 0.15, "{admitted:?}: {ratio}");
    for h in handles {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn interactive_overtakes_a_batch_backlog_and_each_tenant_is_fifo() {
    let log = Log::default();
    let svc = rate_limited(&log, &["sk-ant-fair"]);
    let batch = Tenant::new("nightly").priority(Priority::Batch).weight(10);
    let (alice, bob) = (Tenant::new("alice"), Tenant::new("bob"));
    let backlog = flood(&svc, &batch, 0, 200).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut mine = flood(&svc, &alice, 0, 5).await;
    mine.extend(flood(&svc, &bob, 0, 5).await);
    for h in mine {
        let waited = h.await.unwrap().unwrap();
        // Ten interactive requests, one a second: none waits behind the batch.
        assert!(waited <= 10 * INTERVAL + INTERVAL, "{waited:?}");
    }
    let entries = log.lock().unwrap().clone();
    let first_interactive = entries.iter().position(|(t, _, _)| t != "nightly").unwrap();
    let interactive: Vec<_> = entries[first_interactive..first_interactive + 10]
        .iter()
        .map(|(t, n, _)| (t.clone(), *n))
        .collect();
    assert!(
        interactive.iter().all(|(t, _)| t != "nightly"),
        "{interactive:?}"
    );
    // Alice and bob take turns (equal weights), each in its own order.
    assert_eq!(
        interactive,
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
            .iter()
            .enumerate()
            .map(|(i, n)| (if i % 2 == 0 { "alice" } else { "bob" }.to_owned(), *n))
            .collect::<Vec<_>>()
    );
    for h in backlog {
        h.abort();
    }
    // FIFO within the batch tenant.
    let tasks: Vec<usize> = entries
        .iter()
        .filter(|(t, _, _)| t == "nightly")
        .map(|(_, n, _)| *n)
        .collect();
    assert!(tasks.windows(2).all(|w| w[0] < w[1]), "{tasks:?}");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_takes_nothing() {
    let log = Log::default();
    let layer = RateLimitLayer::new().default_limits(limits());
    let board = layer.quota_board().clone();
    let svc = boxed(
        ServiceBuilder::new()
            .layer(layer)
            .service(recorded(mock(&["sk-ant-fair"]), log.clone())),
    );
    let (a, b) = (Tenant::new("a"), Tenant::new("b"));
    let backlog = flood(&svc, &a, 0, 61).await;
    // b queues behind a's 61st, then gives up after half a second.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        send(svc.clone(), request(&b, 0)),
    )
    .await;
    assert!(gave_up.is_err());
    assert_eq!(board.statuses()[0].queue_depth, 1, "only a's last waits");
    for h in backlog {
        h.await.unwrap().unwrap();
    }
    // a's 61st went at the first refill; b never reached the upstream or took quota.
    assert!(log.lock().unwrap().iter().all(|(t, _, _)| t == "a"));
    tokio::time::sleep(Duration::from_secs(61)).await;
    let status = &board.statuses()[0];
    assert_eq!((status.queue_depth, status.in_flight), (0, 0));
    assert_eq!(status.headroom.requests.unwrap().remaining, RPM);
    assert_eq!(b.stats().queue_wait(), Duration::ZERO);
}

fn pooled(log: &Log) -> ClaudeService {
    let keys = ["sk-ant-pool-a", "sk-ant-pool-b"];
    let board = QuotaBoard::builder().default_limits(limits()).build();
    boxed(
        ServiceBuilder::new()
            .layer(KeyPoolLayer::new(keys).unwrap().board(board.clone()))
            .layer(RateLimitLayer::new().board(board))
            .service(recorded(mock(&keys), log.clone())),
    )
}

#[tokio::test(start_paused = true)]
async fn the_key_pool_line_does_not_starve_a_tenant() {
    let log = Log::default();
    let svc = pooled(&log);
    let (a, b) = (Tenant::new("a"), Tenant::new("b"));
    let backlog = flood(&svc, &a, 0, 500).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waited = send(svc.clone(), request(&b, 0)).await.unwrap();
    // Two keys: an admission every half second.
    assert!(waited < INTERVAL, "b waited {waited:?}");
    assert_eq!(b.stats().queue_wait(), waited);
    for h in backlog {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn the_key_pool_line_weighs_three_to_one_and_keeps_priorities() {
    let log = Log::default();
    let svc = pooled(&log);
    let (a, b) = (Tenant::new("a").weight(3), Tenant::new("b"));
    let batch = Tenant::new("nightly").priority(Priority::Batch).weight(100);
    let mut handles = flood(&svc, &batch, 0, 200).await;
    handles.extend(flood(&svc, &a, 0, 400).await);
    handles.extend(flood(&svc, &b, 0, 400).await);
    tokio::time::sleep(Duration::from_secs(105)).await;
    // The two keys' first 120 went in arrival order (the batch's 120); then a and b share
    // 3:1 and the batch waits.
    let from = 2 * RPM as usize;
    let admitted = counts(&log, from, from + 200);
    assert_eq!(admitted.get("nightly"), None, "{admitted:?}");
    let ratio = admitted["a"] as f64 / admitted["b"] as f64;
    assert!((ratio - 3.0).abs() <= 0.15, "{admitted:?}: {ratio}");
    for h in handles {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_tenant_limit_refuses_past_the_max_wait_and_spares_the_others() {
    let log = Log::default();
    let svc = boxed(
        ServiceBuilder::new()
            .layer(TenantLimitLayer::new().max_wait(Duration::from_secs(10)))
            .service(recorded(mock(&["sk-ant-fair"]), log.clone())),
    );
    let group = ModelCatalog::default().group(MODEL);
    let intern = Tenant::new("intern").limit(group.as_str(), Limits::new(3, 1_000_000, 1_000_000));
    let boss = Tenant::new("boss");
    for i in 0..3 {
        assert_eq!(
            send(svc.clone(), request(&intern, i)).await.unwrap(),
            Duration::ZERO
        );
    }
    // The fourth would wait 20 s for its request unit: refused with the rate limiter's error.
    let err = send(svc.clone(), request(&intern, 3)).await.unwrap_err();
    let err = err.downcast_ref::<AcquireError>().expect("an AcquireError");
    assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
    assert_eq!(err.key().as_str(), "tenant:intern");
    assert_eq!(intern.stats().refusals(), 1);
    assert_eq!(intern.stats().queue_wait(), Duration::ZERO);
    // Others are not held.
    for i in 0..10 {
        assert_eq!(
            send(svc.clone(), request(&boss, i)).await.unwrap(),
            Duration::ZERO
        );
    }
    // Later, a fifth waits for its request unit (under its 10 s by then) instead of failing.
    let waited = send(svc.clone(), request(&intern, 4)).await.unwrap();
    assert!(
        waited > Duration::from_secs(5) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(intern.stats().queue_wait(), waited);
    assert_eq!(log.lock().unwrap().len(), 14);
}

/// The stack with a key pool: the tenant limit sits above it, so a tenant waiting for its
/// own limit holds no upstream quota; the preset applies it by default.
#[tokio::test(start_paused = true)]
async fn the_stack_applies_tenant_limits_above_the_key_pool() {
    let keys = ["sk-ant-pool-a", "sk-ant-pool-b"];
    let log = Log::default();
    let config = StackConfig {
        cache: CacheConfig::Off,
        fallback: false,
        seed: Some(1),
        ..StackConfig::default()
    };
    let stack = ClaudeStack::from_config(&config)
        .unwrap()
        .key_pool(Some(KeyPoolLayer::new(keys).unwrap()));
    let board = stack.quota_board().clone();
    let tenants = stack.tenant_limit_board().unwrap().clone();
    let svc = stack.service(recorded(mock(&keys), log.clone()));
    let group = ModelCatalog::default().group(MODEL);
    let slow = Tenant::new("slow").limit(group.as_str(), Limits::new(1, 1_000_000, 1_000_000));
    let first = send(svc.clone(), request(&slow, 0)).await.unwrap();
    assert_eq!(first, Duration::ZERO);
    let second = tokio::spawn(send(svc.clone(), request(&slow, 1)));
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Waiting for its own limit, it holds no upstream quota.
    assert!(board.statuses().iter().all(|s| s.in_flight == 0));
    assert_eq!(tenants.statuses()[0].queue_depth, 1);
    let waited = second.await.unwrap().unwrap();
    assert!(waited >= Duration::from_secs(59), "{waited:?}");
    assert_eq!(log.lock().unwrap().len(), 2);
}

/// How a user tests their own setup: an app that sets its signed-in user as the `Tenant`
/// gets fair sharing from the rate limiter and per-user limits, checked in paused time.
#[tokio::test(start_paused = true)]
async fn a_users_own_setup_shares_one_key_fairly() {
    // The app's policy: every user weighs the same; "free" users get 10 requests a minute.
    let group = ModelCatalog::default().group(MODEL);
    let user = |name: &str, free: bool| {
        let t = Tenant::new(name.to_owned());
        if free {
            t.limit(group.as_str(), Limits::new(10, 1_000_000, 1_000_000))
        } else {
            t
        }
    };
    let log = Log::default();
    let svc = boxed(
        ServiceBuilder::new()
            .layer(TenantLimitLayer::new())
            .layer(RateLimitLayer::new().default_limits(limits()))
            .service(recorded(mock(&["sk-ant-fair"]), log.clone())),
    );
    let (heavy, free, light) = (
        user("heavy", false),
        user("free", true),
        user("light", false),
    );
    let mut handles = flood(&svc, &heavy, 0, 300).await;
    handles.extend(flood(&svc, &free, 0, 30).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let waited = send(svc.clone(), request(&light, 0)).await.unwrap();
    assert!(waited < 2 * INTERVAL, "{waited:?}");
    tokio::time::sleep(Duration::from_secs(120)).await;
    // In the two minutes, the free user got its 10 a minute (plus its full bucket), the
    // heavy one the rest of the key's quota.
    let entries = log.lock().unwrap().clone();
    let free_sent = entries.iter().filter(|(t, _, _)| t == "free").count();
    assert!((28..=30).contains(&free_sent), "{free_sent}");
    let heavy_sent = entries.iter().filter(|(t, _, _)| t == "heavy").count();
    assert!(heavy_sent + free_sent + 1 >= 60 + 130 - 2, "{heavy_sent}");
    for h in handles {
        h.abort();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A tenant's own limit holds in every window (its bucket: at most the limit at once plus
    /// the refill over the window), whatever the arrivals; a tenant without limits is never
    /// held by it.
    #[test]
    fn a_tenant_never_exceeds_its_own_limit(
        arrivals in proptest::collection::vec((0u64..4_000, any::<bool>()), 1..120),
        rpm in 1u64..20,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (capped, free_waits) = rt.block_on(async move {
            let log = Log::default();
            let svc = boxed(
                ServiceBuilder::new()
                    .layer(TenantLimitLayer::new())
                    .service(recorded(mock(&["sk-ant-fair"]), log.clone())),
            );
            let group = ModelCatalog::default().group(MODEL);
            let capped = Tenant::new("capped").limit(group.as_str(), Limits::new(rpm, 1_000_000, 1_000_000));
            let free = Tenant::new("free");
            let mut handles = Vec::new();
            for (i, (gap_ms, is_capped)) in arrivals.iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(*gap_ms)).await;
                let t = if *is_capped { &capped } else { &free };
                handles.push((*is_capped, tokio::spawn(send(svc.clone(), request(t, i)))));
            }
            let mut free_waits = Vec::new();
            for (is_capped, h) in handles {
                let waited = h.await.unwrap().unwrap();
                if !is_capped {
                    free_waits.push(waited);
                }
            }
            let times: Vec<Instant> = log
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _, _)| t == "capped")
                .map(|(_, _, at)| *at)
                .collect();
            (times, free_waits)
        });
        for (i, start) in capped.iter().enumerate() {
            for (j, end) in capped.iter().enumerate().skip(i) {
                let window = end.duration_since(*start).as_secs_f64();
                let allowed = rpm as f64 + rpm as f64 * window / 60.0;
                prop_assert!((j - i + 1) as f64 <= allowed + 1e-6, "{} in {window} s > {allowed}", j - i + 1);
            }
        }
        prop_assert!(free_waits.iter().all(|w| w.is_zero()));
    }
}
