//! Predictive throttling: `PacingLayer` unit behaviour and the rising-demand simulations
//! against MockClaude (paused time), with and without upstream acceleration limits. `cargo run --example metrics_chart --features
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
use tower_claude::quota::Limits;
use tower_claude::testing::AccelerationLimit;
use tower_claude::testing::simulation::{SimConfig, SimReport, Strategy, simulate, table};

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

/// Demand that rises faster than the upstream's acceleration limit lets usage grow: from 5 to
/// 55 requests per minute in 2 minutes (25 RPM per minute), then steady, for 10 minutes,
/// against 60 RPM whose admitted rate may grow by 10 RPM per minute (floor 10 RPM). The pacing
/// stacks ramp by 8 RPM per minute (docs/metrics.md, "Acceleration limits").
fn accelerating() -> SimConfig {
    SimConfig {
        minutes: 10,
        start_rpm: 5.0,
        end_rpm: 55.0,
        ramp_minutes: Some(2),
        acceleration: Some(AccelerationLimit::new(10, 10)),
        pacing_ramp: Some(8.0),
        ..SimConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn accelerating_demand_pacing_with_a_ramp_versus_plain_buckets() {
    let config = accelerating();
    let buckets = simulate(Strategy::Buckets, &config).await;
    let paced = simulate(Strategy::PacingAndBuckets, &config).await;
    println!("{}", table(&[buckets.clone(), paced.clone()]));
    assert_eq!(buckets.requests, paced.requests, "same workload");
    // Buckets mirroring the per-minute limits admit the sharp rise; the upstream refuses the
    // part above its acceleration ceiling although the buckets hold quota.
    assert!(buckets.upstream_429 > 100, "{}", buckets.upstream_429);
    assert_eq!(buckets.acceleration_429, buckets.upstream_429);
    // Pacing ramps the released rate below the upstream's growth: no 429 at all, nothing lost,
    // and the worst request finishes well before the worst one behind plain buckets.
    assert_eq!(paced.upstream_429, 0);
    assert_eq!((paced.failed, buckets.failed), (0, 0));
    assert!(
        paced.worst_latency + Duration::from_secs(60) < buckets.worst_latency,
        "{:?} vs {:?}",
        paced.worst_latency,
        buckets.worst_latency
    );
}

#[tokio::test(start_paused = true)]
async fn a_jump_from_idle_is_ramped_without_429s() {
    let config = SimConfig {
        start_rpm: 50.0,
        end_rpm: 50.0,
        ramp_minutes: None,
        ..accelerating()
    };
    let buckets = simulate(Strategy::Buckets, &config).await;
    let paced = simulate(Strategy::PacingAndBuckets, &config).await;
    println!("{}", table(&[buckets.clone(), paced.clone()]));
    assert!(
        buckets.acceleration_429 > 100,
        "{}",
        buckets.acceleration_429
    );
    assert_eq!(paced.upstream_429, 0);
    assert_eq!(paced.failed, 0);
    assert!(paced.worst_latency < buckets.worst_latency);
}

#[tokio::test(start_paused = true)]
async fn a_ramp_steeper_than_the_upstream_allows_brings_429s_back() {
    let config = SimConfig {
        pacing_ramp: Some(20.0),
        ..accelerating()
    };
    let paced = simulate(Strategy::PacingAndBuckets, &config).await;
    assert!(paced.acceleration_429 > 0, "{paced:?}");
    // Without a ramp, pacing (quota trigger only) does not see the rise coming at all.
    let config = SimConfig {
        pacing_ramp: None,
        ..accelerating()
    };
    let unramped = simulate(Strategy::PacingAndBuckets, &config).await;
    let buckets = simulate(Strategy::Buckets, &config).await;
    assert!(unramped.acceleration_429 > 100, "{unramped:?}");
    assert!(buckets.acceleration_429 > 100);
}

#[tokio::test(start_paused = true)]
async fn the_ramp_limits_releases_minute_over_minute() {
    let group = RateLimitGroup::new("claude-haiku-4-5");
    let forecaster =
        Forecaster::with_config(Duration::from_secs(10), Duration::from_secs(60), 0.5, 0.3);
    // 120 requests per minute forecast from idle, far below the quota (1 000 RPM) but far
    // steeper than a ramp of 6 RPM per minute.
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
                .limits(group.clone(), Limits::new(1_000, 10_000_000, 1_000_000))
                .ramp(6.0),
        )
        .service(upstream);
    let mut handles = Vec::new();
    for _ in 0..14 {
        let mut svc = svc.clone();
        let fut = svc.ready().await.unwrap().call(request());
        handles.push(tokio::spawn(fut));
    }
    let mut delays = Vec::new();
    for h in handles {
        let response = h.await.unwrap().unwrap();
        delays.push(response.extensions().get::<PacingDelay>().unwrap().0);
    }
    // Released in order, spread out (not a burst), at most 6 in the first minute, at most
    // 6 more than the minute before in any minute after.
    assert_eq!(delays[0], Duration::ZERO);
    assert!(delays.windows(2).all(|w| w[0] < w[1]), "{delays:?}");
    let minute = Duration::from_secs(60);
    let in_window =
        |from: Duration, to: Duration| delays.iter().filter(|&&d| d >= from && d < to).count();
    assert_eq!(in_window(Duration::ZERO, minute), 6, "{delays:?}");
    for step in 0..120u64 {
        let t = Duration::from_secs(step);
        let last = in_window(t.saturating_sub(minute), t + Duration::from_nanos(1));
        let before = in_window(
            t.saturating_sub(minute * 2),
            t.saturating_sub(minute) + Duration::from_nanos(1),
        );
        assert!(
            last <= before + 6,
            "at {t:?}: {last} after {before}; {delays:?}"
        );
    }
}
