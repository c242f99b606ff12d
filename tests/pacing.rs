//! Predictive throttling: `PacingLayer` unit behaviour and the rising-demand simulation
//! against MockClaude (paused time). `cargo run --example metrics_chart --features
//! testing,metrics` prints the same tables (docs/metrics.md).
#![cfg(all(feature = "testing", feature = "metrics"))]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::RateLimitGroup;
use tower_claude::body::RequestBody;
use tower_claude::metrics::forecast::Forecaster;
use tower_claude::metrics::pacing::{PacingDelay, PacingLayer};
use tower_claude::metrics::simulation::{SimConfig, SimReport, Strategy, simulate, table};
use tower_claude::quota::Limits;

async fn run_all(config: &SimConfig) -> Vec<SimReport> {
    let mut reports = Vec::new();
    for strategy in Strategy::ALL {
        reports.push(simulate(strategy, config).await);
    }
    println!("{}", table(&reports));
    reports
}

fn find(reports: &[SimReport], strategy: Strategy) -> &SimReport {
    reports.iter().find(|r| r.strategy == strategy).unwrap()
}

#[tokio::test(start_paused = true)]
async fn rising_demand_pacing_versus_no_limiter_and_plain_buckets() {
    let reports = run_all(&SimConfig::default()).await;
    let none = find(&reports, Strategy::NoLimiter);
    let buckets = find(&reports, Strategy::Buckets);
    let pacing = find(&reports, Strategy::Pacing);
    let both = find(&reports, Strategy::PacingAndBuckets);
    for r in &reports {
        assert_eq!(r.requests, none.requests, "same workload");
    }
    // Without a limiter the rising demand runs into the wall: many 429s, lost requests.
    assert!(none.upstream_429 > 500, "{}", none.upstream_429);
    assert!(none.failed > 0);
    // Pacing alone (no bucket) removes them: every request succeeds without a 429.
    assert_eq!(pacing.upstream_429, 0);
    assert_eq!(pacing.failed, 0);
    // On the rate limiter's board, pacing keeps the buckets' throughput and their worst
    // wait (within 5 s) while spreading the start of the queue.
    assert_eq!(both.upstream_429, 0);
    assert_eq!(both.failed, 0);
    assert!(
        both.worst_queue_wait <= buckets.worst_queue_wait + Duration::from_secs(5),
        "{:?} vs {:?}",
        both.worst_queue_wait,
        buckets.worst_queue_wait
    );
    assert!(both.median_latency <= buckets.median_latency + Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn low_demand_is_never_paced() {
    let config = SimConfig {
        minutes: 5,
        start_rpm: 10.0,
        end_rpm: 30.0,
        ..SimConfig::default()
    };
    let report = simulate(Strategy::Pacing, &config).await;
    assert_eq!(report.failed, 0);
    assert_eq!(report.upstream_429, 0);
    assert_eq!(report.worst_queue_wait, Duration::ZERO);
}

fn request() -> http::Request<RequestBody> {
    http::Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-pacing")
        .body(RequestBody::from(
            r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn requests_are_spaced_at_the_target_rate_while_the_forecast_is_high() {
    let group = RateLimitGroup::new("claude-haiku-4-5");
    let forecaster =
        Forecaster::with_config(Duration::from_secs(10), Duration::from_secs(60), 0.5, 0.3);
    // Demand of 120 requests per minute over the last interval, against 60 RPM.
    for _ in 0..20 {
        forecaster.record(&group, 1, 10, 0);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let upstream = tower::service_fn(move |_req: http::Request<RequestBody>| {
        seen.lock().unwrap().push(Instant::now());
        async { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"{}")))) }
    });
    let svc = ServiceBuilder::new()
        .layer(
            PacingLayer::new(forecaster.clone())
                .limits(group.clone(), Limits::new(60, 1_000_000, 1_000_000))
                .target(0.5),
        )
        .service(upstream);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let mut svc = svc.clone();
        let fut = svc.ready().await.unwrap().call(request());
        handles.push(tokio::spawn(fut));
    }
    let mut delays = Vec::new();
    for h in handles {
        let response = h.await.unwrap().unwrap();
        delays.push(response.extensions().get::<PacingDelay>().unwrap().0);
    }
    // 50 % of 60 RPM: one request every 2 s, the first at once.
    assert_eq!(delays, [0, 2, 4, 6].map(Duration::from_secs));
    let calls = calls.lock().unwrap();
    let offsets: Vec<_> = calls.iter().map(|t| t.duration_since(start)).collect();
    assert_eq!(offsets, [0, 2, 4, 6].map(Duration::from_secs));
}

#[tokio::test(start_paused = true)]
async fn pacing_stops_when_the_forecast_falls_below_release() {
    let group = RateLimitGroup::new("claude-haiku-4-5");
    let forecaster =
        Forecaster::with_config(Duration::from_secs(10), Duration::from_secs(10), 1.0, 1.0);
    for _ in 0..20 {
        forecaster.record(&group, 1, 10, 0);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
    });
    let svc = ServiceBuilder::new()
        .layer(
            PacingLayer::new(forecaster.clone())
                .limits(group.clone(), Limits::new(60, 1_000_000, 1_000_000)),
        )
        .service(upstream);
    let delay = |r: &http::Response<Full<Bytes>>| r.extensions().get::<PacingDelay>().unwrap().0;
    let first = svc.clone().oneshot(request()).await.unwrap();
    let second = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(delay(&first), Duration::ZERO);
    assert!(
        delay(&second) > Duration::ZERO,
        "paced while demand is 120 RPM"
    );
    // A quiet interval: the forecast drops to zero and pacing stops.
    tokio::time::advance(Duration::from_secs(20)).await;
    let third = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(delay(&third), Duration::ZERO);
}
