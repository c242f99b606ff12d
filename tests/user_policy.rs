//! How to unit-test your own policy: MockClaude plus tokio's paused clock.
//!
//! This file is documentation as much as a test. It shows the pattern a user of the crate
//! follows to check, in milliseconds of real time, what their stack does over minutes or hours
//! of simulated traffic:
//!
//! 1. build a [`MockClaude`] with the limits and faults you want to survive (it enforces
//!    continuous token buckets per key and model group, like the real API, and answers with the
//!    real headers and error envelopes);
//! 2. wrap it in the layers you use in production — here the preset [`ClaudeStack`], but any
//!    `ServiceBuilder` of this crate's layers works the same;
//! 3. run the test with `#[tokio::test(start_paused = true)]`: every wait (quota, retry
//!    backoff, simulated latency) is on tokio's clock, which jumps ahead whenever all tasks
//!    are idle, so the test is fast and deterministic;
//! 4. assert on what your callers saw (statuses, latency in simulated time) and on what the
//!    upstream saw ([`MockClaude::stats`]: requests, 429s, tokens per group).
#![cfg(feature = "testing")]

use std::time::Duration;

use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_claude::body::RequestBody;
use tower_claude::quota::Limits;
use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
use tower_claude::testing::{MockClaude, MockLimits};

fn request(i: usize) -> Request<RequestBody> {
    let body = format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":300,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
    );
    Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

/// Policy under test: "a burst of 150 tasks against a 50-requests-a-minute key finishes within
/// four simulated minutes, no task fails, and we never make the server refuse us".
#[tokio::test(start_paused = true)]
async fn a_burst_three_times_the_quota_finishes_without_a_single_429() {
    // 1. The upstream we must survive: 50 requests / minute, 5 % of answers overloaded.
    let mock = MockClaude::builder()
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: 50,
                itpm: 100_000,
                otpm: 50_000,
            },
        )
        .overloaded_rate(0.05)
        .seed(42)
        .latency(Duration::from_millis(500), Duration::from_millis(2))
        .output_tokens(150)
        .build();

    // 2. Our production policy: the preset stack, with the limits we know, no cache (every
    //    task is distinct anyway) and no fallback (we insist on Haiku).
    let mut config = StackConfig {
        cache: CacheConfig::Off,
        fallback: false,
        seed: Some(1),
        ..StackConfig::default()
    };
    config.limits.insert(
        "claude-haiku-4-5".into(),
        Limits {
            rpm: 50,
            itpm: 100_000,
            otpm: 50_000,
        },
    );
    let svc = ClaudeStack::from_config(&config)
        .unwrap()
        .service(mock.clone());

    // 3. The burst: 150 tasks, 32 at a time.
    let start = Instant::now();
    let statuses: Vec<u16> = futures_util::stream::iter(0..150)
        .map(|i| {
            let svc = svc.clone();
            async move {
                let resp = svc.oneshot(request(i)).await.expect("no task errors out");
                let status = resp.status().as_u16();
                resp.into_body().collect().await.expect("a complete body");
                status
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let took = start.elapsed();

    // 4. What the callers saw, and what the upstream saw.
    assert!(
        statuses.iter().all(|s| *s == 200),
        "some tasks failed: {statuses:?}"
    );
    assert!(
        took < Duration::from_secs(240),
        "took {took:?} of simulated time"
    );
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0, "the server had to refuse us");
    assert_eq!(stats.accepted, 150);
    // The 529s were retried, so the upstream saw a few more requests than tasks.
    assert!(stats.received > 150);
}

/// The same pattern shows what goes wrong WITHOUT the stack, so the test above is meaningful.
#[tokio::test(start_paused = true)]
async fn the_same_burst_without_the_stack_gets_refused() {
    let mock = MockClaude::builder()
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: 50,
                itpm: 100_000,
                otpm: 50_000,
            },
        )
        .seed(42)
        .build();
    let refused = futures_util::stream::iter(0..150)
        .map(|i| {
            let mock = mock.clone();
            async move { mock.oneshot(request(i)).await.unwrap().status().as_u16() }
        })
        .buffer_unordered(32)
        .filter(|s| std::future::ready(*s == 429))
        .count()
        .await;
    assert_eq!(refused, 100, "only the first 50 fit in the first minute");
}

// ---------------------------------------------------------------------------------------------
// Your own fallback policy and retry policy.
//
// A policy is a plain object: unit-test its decisions alone first (no service, no clock), then
// put it in the stack over MockClaude with paused time and check what callers and the upstream
// saw, next to the same run with the default policy so the test shows the difference.
// ---------------------------------------------------------------------------------------------

use tower_claude::anthropic::RequestMeta;
use tower_claude::fallback::{self, FallbackLayer, PolicyExt as _, QuotaView, ServedModel};
use tower_claude::retry::{self, RetryInfo, RetryLayer, RetryOutcome};

/// Our fallback rule: the default thresholds, but never Haiku (its answers are too short for
/// this product). When Opus and Sonnet are both low, the one with more headroom is used.
fn no_haiku() -> impl fallback::Policy {
    fallback::Thresholds::default().and(fallback::policy_fn(|c| {
        if c.model().starts_with("claude-haiku") {
            fallback::Action::Exclude
        } else {
            fallback::Action::Use
        }
    }))
}

/// Our retry rule: the default rules, but a 500 is returned at once (our gateway's 500s are
/// deterministic: retrying one only burns quota).
struct No500Retries;

impl retry::Policy for No500Retries {
    fn classify(&self, attempt: &retry::Attempt<'_>) -> retry::Action {
        if attempt.status() == Some(http::StatusCode::INTERNAL_SERVER_ERROR) {
            return retry::Action::Return;
        }
        retry::Transient.classify(attempt)
    }
}

fn opus_request(i: usize) -> Request<RequestBody> {
    let body = format!(
        r#"{{"model":"claude-opus-4-7","max_tokens":100,"messages":[{{"role":"user","content":"q{i}"}}]}}"#
    );
    Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

#[test]
fn the_fallback_policy_decides_alone() {
    use fallback::{Action, Candidate, Policy};
    let policy = no_haiku();
    let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":100}"#).unwrap();
    let full = QuotaView::new(1.0, true, Some(Duration::ZERO));
    let low = QuotaView::new(0.1, true, Some(Duration::ZERO));
    // Opus with room: used. Opus low: skipped (not excluded: still a last resort).
    let opus = |q| Candidate::new(&meta, "claude-opus-4-7", 0, q);
    assert_eq!(policy.decide(&opus(full)), Action::Use);
    assert_eq!(policy.decide(&opus(low)), Action::Skip);
    // Haiku: never, however full.
    let haiku = Candidate::new(&meta, "claude-haiku-4-5", 2, full);
    assert_eq!(policy.decide(&haiku), Action::Exclude);
}

#[test]
fn the_retry_policy_decides_alone() {
    use retry::{Action, Attempt, Policy};
    let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":100}"#).unwrap();
    let headers = http::HeaderMap::new();
    let status =
        |s: u16| Attempt::response(&meta, 1, http::StatusCode::from_u16(s).unwrap(), &headers);
    assert_eq!(No500Retries.classify(&status(500)), Action::Return);
    assert_eq!(No500Retries.classify(&status(529)), Action::Retry);
    assert_eq!(No500Retries.classify(&status(400)), Action::Return);
}

/// Eight Opus requests in a row against 2 requests a minute for Opus and Sonnet: returns the
/// model that served each.
async fn served_models(policy: Option<Box<dyn fallback::Policy>>) -> Vec<String> {
    let tight = MockLimits {
        rpm: 2,
        itpm: 100_000,
        otpm: 100_000,
    };
    let mock = MockClaude::builder()
        .limits("claude-opus-4-7", tight)
        .limits("claude-sonnet-4-6", tight)
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: 1_000,
                ..tight
            },
        )
        .seed(7)
        .build();
    let mut config = StackConfig {
        cache: CacheConfig::Off,
        seed: Some(1),
        ..StackConfig::default()
    };
    for group in ["claude-opus-4", "claude-sonnet-4"] {
        config
            .limits
            .insert(group.into(), Limits::new(2, 100_000, 100_000));
    }
    let mut stack = ClaudeStack::from_config(&config).unwrap();
    if let Some(policy) = policy {
        stack = stack.fallback(Some(FallbackLayer::new().policy(policy)));
    }
    let svc = stack.service(mock);
    let mut served = Vec::new();
    for i in 0..8 {
        let resp = svc.clone().oneshot(opus_request(i)).await.unwrap();
        assert_eq!(resp.status(), 200);
        served.push(
            resp.extensions()
                .get::<ServedModel>()
                .unwrap()
                .served
                .to_string(),
        );
        resp.into_body().collect().await.unwrap();
    }
    served
}

#[tokio::test(start_paused = true)]
async fn a_user_fallback_policy_in_the_stack() {
    let default = served_models(None).await;
    assert!(
        default.iter().any(|m| m.starts_with("claude-haiku")),
        "the default policy falls back to Haiku: {default:?}"
    );
    let ours = served_models(Some(Box::new(no_haiku()))).await;
    assert!(
        ours.iter().all(|m| !m.starts_with("claude-haiku")),
        "never Haiku: {ours:?}"
    );
    assert!(
        ours.iter().any(|m| m.starts_with("claude-sonnet")),
        "{ours:?}"
    );
}

/// One request against an upstream that always answers 500: (attempts the upstream saw, the
/// caller's status, the retry outcome).
async fn against_500s(layer: RetryLayer) -> (u64, u16, RetryOutcome) {
    let mock = MockClaude::builder().server_error_rate(1.0).seed(3).build();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.max_attempts(4).seed(1))
        .service(mock.clone());
    let resp = svc.oneshot(opus_request(0)).await.unwrap();
    let outcome = resp.extensions().get::<RetryInfo>().unwrap().outcome();
    (mock.stats().received, resp.status().as_u16(), outcome)
}

#[tokio::test(start_paused = true)]
async fn a_user_retry_policy_in_the_stack() {
    let (received, status, outcome) = against_500s(RetryLayer::new()).await;
    assert_eq!(
        (received, status, outcome),
        (4, 500, RetryOutcome::Exhausted)
    );
    let start = Instant::now();
    let (received, status, outcome) = against_500s(RetryLayer::new().policy(No500Retries)).await;
    assert_eq!(
        (received, status, outcome),
        (1, 500, RetryOutcome::NotRetryable)
    );
    // Returned at once: no backoff was slept.
    assert!(start.elapsed() < Duration::from_secs(1));
}
