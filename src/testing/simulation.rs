//! A paused-time workload simulation against [`MockClaude`]:
//! rising demand through one of four stacks, to compare predictive pacing with plain token
//! buckets and with no limiter (used by `tests/pacing.rs` and `examples/metrics_chart.rs`),
//! optionally against an upstream with acceleration limits ([`SimConfig::acceleration`]).
//!
//! Run it inside a runtime with paused time (`#[tokio::test(start_paused = true)]`): a
//! simulated quarter of an hour takes well under a second.
//!
//! ```
//! use tower_claude::testing::simulation::{SimConfig, Strategy, simulate};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let config = SimConfig { minutes: 2, start_rpm: 10.0, end_rpm: 20.0, ..SimConfig::default() };
//! let report = simulate(Strategy::NoLimiter, &config).await;
//! assert_eq!(report.succeeded + report.failed, report.requests);
//! assert_eq!(report.upstream_429, 0); // 20 rpm is far below the 60 rpm limit
//! # }
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

use crate::BoxError;
use crate::anthropic::{RateLimitGroup, retry_after};
use crate::body::RequestBody;
use crate::metrics::MetricsLayer;
use crate::metrics::forecast::Forecaster;
use crate::metrics::pacing::{PacingDelay, PacingLayer};
use crate::quota::{Limits, QuotaBoard, TokenBucket};
use crate::rate_limit::{QueueWait, RateLimitLayer};
use crate::testing::{AccelerationLimit, MockClaude, MockLimits};

/// The stack between the simulated callers and the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// Metrics only: callers meet upstream 429s and retry after `retry-after`.
    NoLimiter,
    /// A [`RateLimitLayer`] with the upstream limits.
    Buckets,
    /// A [`PacingLayer`] with the upstream limits, no bucket.
    Pacing,
    /// A [`PacingLayer`] outside a [`RateLimitLayer`].
    PacingAndBuckets,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 4] = [
        Strategy::NoLimiter,
        Strategy::Buckets,
        Strategy::Pacing,
        Strategy::PacingAndBuckets,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::NoLimiter => "no limiter",
            Strategy::Buckets => "plain buckets",
            Strategy::Pacing => "pacing",
            Strategy::PacingAndBuckets => "pacing + buckets",
        }
    }
}

/// The workload.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Minutes during which requests arrive.
    pub minutes: u32,
    /// Arrival rate at the start, requests per minute.
    pub start_rpm: f64,
    /// Arrival rate at the end (linear ramp), requests per minute.
    pub end_rpm: f64,
    /// Upstream (and configured) limits of the model's group.
    pub limits: Limits,
    /// Requests per minute another client sends on the same key directly upstream (outside
    /// the stack), all along.
    pub background_rpm: f64,
    /// `max_tokens` of each request.
    pub max_tokens: u64,
    /// Output tokens of each answer.
    pub output_tokens: u64,
    /// Attempts per request (a caller retries an upstream 429 after its `retry-after`,
    /// like the official SDKs).
    pub attempts: u32,
    /// Poisson arrivals (exponential gaps, seeded) instead of evenly spaced ones.
    pub poisson: bool,
    /// The upstream also enforces the RPM limit over this shorter window (Anthropic documents
    /// that "60 RPM may be enforced as 1 request per second"): a bucket of
    /// `rpm * window / 60` requests refilling at the same rate; a request it cannot hold gets
    /// a 429 with `retry-after`.
    pub short_window: Option<Duration>,
    /// Demand reaches `end_rpm` after this many minutes and stays there (`None`: the ramp
    /// lasts the whole run).
    pub ramp_minutes: Option<u32>,
    /// The upstream's acceleration limit ([`AccelerationLimit`]; `None`: none).
    pub acceleration: Option<AccelerationLimit>,
    /// The pacing stacks' [`PacingLayer::ramp`] (`None`: no ramp).
    pub pacing_ramp: Option<f64>,
    /// The pacing stacks' [`PacingLayer::trigger`] (`None`: the default, 0.8). A tiny value
    /// keeps pacing on from the first forecast.
    pub pacing_trigger: Option<f64>,
}

impl Default for SimConfig {
    /// 12 minutes ramping from 20 to 100 requests per minute against 60 RPM, 100 000 ITPM,
    /// 20 000 OTPM; 150-token answers, `max_tokens` 512, 20 attempts (a patient caller);
    /// evenly spaced arrivals, per-minute enforcement only, no acceleration limit, no ramp.
    fn default() -> Self {
        Self {
            minutes: 12,
            start_rpm: 20.0,
            end_rpm: 100.0,
            limits: Limits::new(60, 100_000, 20_000),
            background_rpm: 0.0,
            max_tokens: 512,
            output_tokens: 150,
            attempts: 20,
            poisson: false,
            short_window: None,
            ramp_minutes: None,
            acceleration: None,
            pacing_ramp: None,
            pacing_trigger: None,
        }
    }
}

/// One 10-second sample of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    /// Arrivals per minute over the sample.
    pub demand_rpm: f64,
    /// Upstream 200s per minute over the sample.
    pub served_rpm: f64,
    /// Upstream 429s in the sample.
    pub rejected: u64,
    /// The forecast of requests per minute at the end of the sample.
    pub forecast_rpm: f64,
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// The stack.
    pub strategy: Strategy,
    /// Requests the callers made (background traffic excluded).
    pub requests: u64,
    /// Requests that got a 200.
    pub succeeded: u64,
    /// Requests that gave up (attempts exhausted).
    pub failed: u64,
    /// Upstream 429s (every attempt of every caller, background included).
    pub upstream_429: u64,
    /// The part of `upstream_429` due to the upstream's acceleration limit.
    pub acceleration_429: u64,
    /// The longest time a request waited in the stack before it was sent (rate-limit queue
    /// plus pacing), over every attempt.
    pub worst_queue_wait: Duration,
    /// The longest time from arrival to the final answer.
    pub worst_latency: Duration,
    /// The median time from arrival to the final answer.
    pub median_latency: Duration,
    /// 10-second samples.
    pub samples: Vec<Sample>,
}

type Client = BoxCloneService<
    http::Request<RequestBody>,
    http::Response<UnsyncBoxBody<Bytes, BoxError>>,
    BoxError,
>;

const MODEL: &str = "claude-sonnet-4-6";
const GROUP: &str = "claude-sonnet-4";
const SAMPLE: Duration = Duration::from_secs(10);

fn request(max_tokens: u64, key: &str) -> http::Request<RequestBody> {
    let body = format!(
        r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Summarise the quarterly report in three bullet points."}}]}}"#
    );
    http::Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(RequestBody::from(body))
        .unwrap_or_else(|_| http::Request::new(RequestBody::empty()))
}

fn build(strategy: Strategy, config: &SimConfig, mock: Client, forecaster: &Forecaster) -> Client {
    let group = RateLimitGroup::new(GROUP);
    let metrics = MetricsLayer::new().forecaster(forecaster.clone());
    let board = QuotaBoard::new();
    let buckets = || {
        RateLimitLayer::new()
            .board(board.clone())
            .limits(group.clone(), config.limits)
    };
    let mut pacing = PacingLayer::new(forecaster.clone()).limits(group.clone(), config.limits);
    if let Some(ramp) = config.pacing_ramp {
        pacing = pacing.ramp(ramp);
    }
    if let Some(trigger) = config.pacing_trigger {
        pacing = pacing.trigger(trigger);
    }
    let pacing_on_board = pacing.clone().board(board.clone());
    let boxed = |r: http::Response<_>| r.map(BodyExt::boxed_unsync);
    match strategy {
        Strategy::NoLimiter => BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(|r: http::Response<_>| {
                    r.map(|b: crate::metrics::MetricsBody<_>| b.boxed_unsync())
                })
                .layer(metrics)
                .service(mock),
        ),
        Strategy::Buckets => BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(|r: http::Response<_>| {
                    r.map(|b: crate::metrics::MetricsBody<_>| b.boxed_unsync())
                })
                .layer(metrics)
                .map_response(boxed)
                .layer(buckets())
                .service(mock),
        ),
        Strategy::Pacing => BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(|r: http::Response<_>| {
                    r.map(|b: crate::metrics::MetricsBody<_>| b.boxed_unsync())
                })
                .layer(metrics)
                .layer(pacing)
                .service(mock),
        ),
        Strategy::PacingAndBuckets => BoxCloneService::new(
            ServiceBuilder::new()
                .map_response(|r: http::Response<_>| {
                    r.map(|b: crate::metrics::MetricsBody<_>| b.boxed_unsync())
                })
                .layer(metrics)
                .layer(pacing_on_board)
                .map_response(boxed)
                .layer(buckets())
                .service(mock),
        ),
    }
}

/// The simulator, behind the optional short-window enforcement.
fn upstream(mock: MockClaude, config: &SimConfig, rejected: Arc<AtomicU64>) -> Client {
    let window = config.short_window.map(|window| {
        let capacity = (config.limits.rpm as f64 * window.as_secs_f64() / 60.0).ceil() as u64;
        Arc::new(Mutex::new(TokenBucket::new(
            capacity.max(1),
            window,
            Instant::now(),
        )))
    });
    BoxCloneService::new(tower::service_fn(move |req: http::Request<RequestBody>| {
        let mock = mock.clone();
        let window = window.clone();
        let rejected = rejected.clone();
        async move {
            if let Some(bucket) = window {
                let now = Instant::now();
                let mut bucket = bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if bucket.try_take(1, now).is_err() {
                    let wait = bucket.time_until(1, now).unwrap_or(Duration::from_secs(1));
                    drop(bucket);
                    rejected.fetch_add(1, Ordering::Relaxed);
                    let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your per-minute rate limit (enforced over a shorter window)."}}"#;
                    let response = http::Response::builder()
                        .status(429)
                        .header("content-type", "application/json")
                        .header(
                            "retry-after",
                            wait.as_secs_f64().ceil().max(1.0).to_string(),
                        )
                        .body(
                            http_body_util::Full::new(Bytes::from_static(body.as_bytes()))
                                .map_err(|never| match never {})
                                .boxed_unsync(),
                        )?;
                    return Ok(response);
                }
            }
            let response = mock.oneshot(req).await?;
            Ok::<_, BoxError>(response.map(BodyExt::boxed_unsync))
        }
    }))
}

#[derive(Debug, Default)]
struct Tally {
    succeeded: u64,
    failed: u64,
    worst_queue_wait: Duration,
    latencies: Vec<Duration>,
    arrivals: Vec<f64>,
    served: Vec<f64>,
    rejected: Vec<f64>,
}

/// Runs `strategy` on the workload of `config` and reports.
pub async fn simulate(strategy: Strategy, config: &SimConfig) -> SimReport {
    let mock_limits = MockLimits::new(config.limits.rpm, config.limits.itpm, config.limits.otpm);
    let mut mock = MockClaude::builder()
        .limits(GROUP, mock_limits)
        .latency(Duration::from_millis(400), Duration::from_millis(4))
        .output_tokens(config.output_tokens)
        .seed(1);
    if let Some(accel) = config.acceleration {
        mock = mock.acceleration_limit(accel);
    }
    let mock = mock.build();
    let forecaster = Forecaster::new();
    let short_429 = Arc::new(AtomicU64::new(0));
    let upstream = upstream(mock.clone(), config, short_429.clone());
    let client = build(strategy, config, upstream.clone(), &forecaster);
    let mut rng = fastrand::Rng::with_seed(7);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(u64::from(config.minutes) * 60);
    let group = RateLimitGroup::new(GROUP);

    // Background traffic on the same key, straight to the simulator.
    if config.background_rpm > 0.0 {
        let mock = upstream.clone();
        let gap = Duration::from_secs_f64(60.0 / config.background_rpm);
        let max_tokens = config.max_tokens;
        tokio::spawn(async move {
            while Instant::now() < end {
                let m = mock.clone();
                tokio::spawn(async move {
                    if let Ok(r) = m.oneshot(request(max_tokens, "sk-ant-sim")).await {
                        let _ = r.into_body().collect().await;
                    }
                });
                tokio::time::sleep(gap).await;
            }
        });
    }

    // Callers: arrivals on a linear ramp.
    let mut tasks = Vec::new();
    let mut samples = Vec::new();
    let mut next_sample = start + SAMPLE;
    let mut requests = 0u64;
    loop {
        let now = Instant::now();
        while now >= next_sample {
            samples.push(sample_at(&forecaster, &group, next_sample - start));
            next_sample += SAMPLE;
        }
        if now >= end {
            break;
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        let ramp_minutes = config.ramp_minutes.unwrap_or(config.minutes).max(1);
        let share = (elapsed / (f64::from(ramp_minutes) * 60.0)).min(1.0);
        let rpm = config.start_rpm + (config.end_rpm - config.start_rpm) * share;
        requests += 1;
        let client = client.clone();
        let tally = tally.clone();
        let (attempts, max_tokens) = (config.attempts, config.max_tokens);
        tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .arrivals
            .push(elapsed);
        tasks.push(tokio::spawn(async move {
            caller(client, attempts, max_tokens, tally, start).await;
        }));
        let mean = 60.0 / rpm.max(0.1);
        let gap = if config.poisson {
            // Exponential gap; 1 - f64() is in (0, 1].
            -(1.0 - rng.f64()).ln() * mean
        } else {
            mean
        };
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
    }
    // Keep sampling while the backlog drains.
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep_until(next_sample).await;
        samples.push(sample_at(&forecaster, &group, next_sample - start));
        next_sample += SAMPLE;
    }
    for task in tasks {
        let _ = task.await;
    }
    let tally = std::mem::take(
        &mut *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let stats = mock.stats();
    let mut latencies = tally.latencies.clone();
    latencies.sort();
    let median_latency = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let bin = |ts: &[f64], i: usize| {
        ts.iter()
            .filter(|&&t| t >= i as f64 * 10.0 && t < (i + 1) as f64 * 10.0)
            .count()
    };
    for (i, s) in samples.iter_mut().enumerate() {
        s.demand_rpm = bin(&tally.arrivals, i) as f64 * 6.0;
        s.served_rpm = bin(&tally.served, i) as f64 * 6.0;
        s.rejected = bin(&tally.rejected, i) as u64;
    }
    SimReport {
        strategy,
        requests,
        succeeded: tally.succeeded,
        failed: tally.failed,
        upstream_429: stats.by_status.get(&429).copied().unwrap_or(0)
            + short_429.load(Ordering::Relaxed),
        acceleration_429: stats.acceleration_limited,
        worst_queue_wait: tally.worst_queue_wait,
        worst_latency: latencies.last().copied().unwrap_or_default(),
        median_latency,
        samples,
    }
}

fn sample_at(forecaster: &Forecaster, group: &RateLimitGroup, t: Duration) -> Sample {
    Sample {
        t: t.as_secs_f64(),
        forecast_rpm: forecaster
            .forecast(group)
            .map_or(0.0, |f| f.forecast.requests),
        ..Sample::default()
    }
}

async fn caller(
    client: Client,
    attempts: u32,
    max_tokens: u64,
    tally: Arc<Mutex<Tally>>,
    start: Instant,
) {
    let arrived = Instant::now();
    let mut ok = false;
    for _ in 0..attempts.max(1) {
        let Ok(response) = client
            .clone()
            .oneshot(request(max_tokens, "sk-ant-sim"))
            .await
        else {
            break;
        };
        let wait = response
            .extensions()
            .get::<QueueWait>()
            .map_or(Duration::ZERO, |w| w.0)
            + response
                .extensions()
                .get::<PacingDelay>()
                .map_or(Duration::ZERO, |w| w.0);
        let status = response.status();
        let delay = retry_after(response.headers(), std::time::SystemTime::now())
            .unwrap_or(Duration::from_secs(1));
        let _ = response.into_body().collect().await;
        let at = Instant::now().duration_since(start).as_secs_f64();
        let retry = {
            let mut t = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.worst_queue_wait = t.worst_queue_wait.max(wait);
            if status.is_success() {
                t.served.push(at);
                ok = true;
                false
            } else if status.as_u16() == 429 {
                t.rejected.push(at);
                true
            } else {
                false
            }
        };
        if !retry {
            break;
        }
        tokio::time::sleep(delay).await;
    }
    let mut t = tally
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if ok {
        t.succeeded += 1;
    } else {
        t.failed += 1;
    }
    t.latencies.push(arrived.elapsed());
}

/// A Markdown table of `reports`.
pub fn table(reports: &[SimReport]) -> String {
    let mut out = String::from(
        "| stack | requests | succeeded | failed | upstream 429s | worst queue wait | median latency | worst latency |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} s | {:.1} s | {:.1} s |",
            r.strategy.name(),
            r.requests,
            r.succeeded,
            r.failed,
            r.upstream_429,
            r.worst_queue_wait.as_secs_f64(),
            r.median_latency.as_secs_f64(),
            r.worst_latency.as_secs_f64(),
        );
    }
    out
}

/// An SVG chart of the runs: demand, forecast, the limit, and the throughput each stack got
/// upstream (lines), with upstream 429s per 10 s of the first run as bars (the title names
/// the acceleration limit when the workload has one).
pub fn svg_chart(reports: &[SimReport], config: &SimConfig) -> String {
    const W: f64 = 900.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 60.0;
    const RIGHT: f64 = 190.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    let t_max = reports
        .iter()
        .flat_map(|r| r.samples.last())
        .map(|s| s.t)
        .fold(60.0, f64::max);
    let paced = reports
        .iter()
        .find(|r| matches!(r.strategy, Strategy::Pacing | Strategy::PacingAndBuckets));
    let y_max = reports
        .iter()
        .flat_map(|r| r.samples.iter())
        .map(|s| s.demand_rpm.max(s.served_rpm))
        .chain(
            paced
                .iter()
                .flat_map(|r| r.samples.iter().map(|s| s.forecast_rpm)),
        )
        .fold(config.limits.rpm as f64 * 1.5, f64::max)
        .ceil();
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / t_max;
    let y = |v: f64| H - BOTTOM - (H - TOP - BOTTOM) * (v / y_max).min(1.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>
"##,
        match config.acceleration {
            Some(a) => format!(
                "Rising demand vs {} RPM and a +{} RPM/min acceleration limit (requests/min, simulated)",
                config.limits.rpm, a.growth_per_minute
            ),
            None => format!(
                "Rising demand against {} RPM: requests per minute (simulated, paused time)",
                config.limits.rpm
            ),
        }
    );
    // Axes and grid.
    let steps = 5;
    for i in 0..=steps {
        let v = y_max * f64::from(i) / f64::from(steps);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text>"##,
            W - RIGHT,
            y(v),
            y(v),
            LEFT - 6.0,
            y(v) + 4.0,
            v
        );
    }
    let minutes = (t_max / 60.0).ceil() as u32;
    for m in 0..=minutes {
        let t = f64::from(m) * 60.0;
        if t > t_max {
            break;
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{m}</text>"##,
            x(t),
            H - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">minutes</text>"##,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0
    );
    // 429 bars of the first run.
    if let Some(first) = reports.first() {
        for s in &first.samples {
            if s.rejected > 0 {
                let v = s.rejected as f64 * 6.0;
                let _ = writeln!(
                    svg,
                    r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#f4a3a3"/>"##,
                    x(s.t - 10.0),
                    y(v),
                    (x(10.0) - x(0.0)).max(1.0),
                    (H - BOTTOM - y(v)).max(0.0)
                );
            }
        }
    }
    let limit = config.limits.rpm as f64;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="6 4" stroke-width="2"/>"##,
        W - RIGHT,
        y(limit),
        y(limit)
    );
    let polyline = |points: Vec<(f64, f64)>, color: &str, width: f64, dash: &str| {
        let pts: Vec<String> = points
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        format!(
            r##"<polyline fill="none" stroke="{color}" stroke-width="{width}" stroke-dasharray="{dash}" points="{}"/>"##,
            pts.join(" ")
        )
    };
    let mut legend: Vec<(String, String, &str)> = vec![
        ("#d62728".into(), format!("limit ({limit:.0} RPM)"), "6 4"),
        (
            "#f4a3a3".into(),
            format!(
                "429s ({}) x6",
                reports.first().map_or("", |r| r.strategy.name())
            ),
            "",
        ),
    ];
    if let Some(first) = reports.first() {
        let demand = first.samples.iter().map(|s| (s.t, s.demand_rpm)).collect();
        svg.push_str(&polyline(demand, "#7f7f7f", 1.5, ""));
        svg.push('\n');
        legend.push(("#7f7f7f".into(), "demand".into(), ""));
    }
    if let Some(paced) = paced {
        let forecast = paced
            .samples
            .iter()
            .map(|s| (s.t, s.forecast_rpm))
            .collect();
        svg.push_str(&polyline(forecast, "#9467bd", 1.5, "3 3"));
        svg.push('\n');
        legend.push(("#9467bd".into(), "Holt forecast (+1 min)".into(), "3 3"));
    }
    let colors = ["#ff7f0e", "#1f77b4", "#2ca02c", "#17becf"];
    for (r, color) in reports.iter().zip(colors) {
        let served = r.samples.iter().map(|s| (s.t, s.served_rpm)).collect();
        svg.push_str(&polyline(served, color, 2.0, ""));
        svg.push('\n');
        legend.push((color.into(), format!("served: {}", r.strategy.name()), ""));
    }
    for (i, (color, label, dash)) in legend.iter().enumerate() {
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = W - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{lx}" x2="{:.1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{label}</text>"##,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
