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
