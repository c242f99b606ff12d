//! The scale scenario of issue 12 in process, on tokio's paused clock: [`MockClaude`] with
//! per-key limits, one proxy-like stack (cache and fallback off, a key pool of `keys` keys
//! above the rate limiter, retry) and one fleet of concurrent Opus tasks per key, of the
//! sizes `loadgen fleet` sends to a real proxy in `scripts/scale-bench.sh`
//! ([`fleet_task`]). A run is deterministic: the same configuration gives the same times,
//! in well under a second of wall time.
//!
//! ```
//! use tower_claude::testing::scale::{ScaleConfig, run};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let config = ScaleConfig { tasks_per_fleet: 130, ..ScaleConfig::default() };
//! let report = run(&config).await;
//! assert_eq!(report.failed, 0);
//! assert_eq!(report.upstream_429, 0);
//! assert!(report.elapsed.as_secs_f64() >= report.ideal.as_secs_f64());
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::body::RequestBody;
use crate::key_pool::{ChosenKey, KeyPoolLayer};
use crate::stack::{CacheConfig, ClaudeStack, StackConfig};
use crate::testing::{MockClaude, MockLimits};

/// The workload and the upstream of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    /// Keys of the pool; one fleet per key.
    pub keys: usize,
    /// Tasks of each fleet.
    pub tasks_per_fleet: u64,
    /// Requests in flight per fleet.
    pub concurrency: usize,
    /// The upstream's limits per key and model family.
    pub limits: MockLimits,
    /// The upstream's answer time.
    pub latency: Duration,
    /// Output tokens of every answer.
    pub output_tokens: u64,
    /// The seed of the first fleet's task sizes (fleet `f` uses `seed + f − 1`, as
    /// `scripts/scale-bench.sh` passes `--seed f`).
    pub seed: u64,
    /// The upstream's limits change to these this long after the start (an organisation
    /// moving up a tier, the `raise` configuration of `scripts/scale-bench.sh`): a raise
    /// adds the extra capacity to the buckets at once ([`MockClaude::set_limits`]).
    pub raise: Option<(Duration, MockLimits)>,
    /// Sample the board's levels and the upstream's this often ([`ScaleReport::trace`]).
    pub trace_every: Option<Duration>,
}

impl Default for ScaleConfig {
    /// Issue 12's setup: one key, 200 tasks, 16 in flight, RPM 120 / ITPM 40k / OTPM 8k,
    /// answers of 60 output tokens after 500 ms.
    fn default() -> Self {
        Self {
            keys: 1,
            tasks_per_fleet: 200,
            concurrency: 16,
            limits: MockLimits::new(120, 40_000, 8_000),
            latency: Duration::from_millis(500),
            output_tokens: 60,
            seed: 1,
            raise: None,
            trace_every: None,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleReport {
    /// Until the last fleet finished.
    pub elapsed: Duration,
    /// When each fleet finished.
    pub fleets: Vec<Duration>,
    /// Tasks that did not end with a complete 200.
    pub failed: u64,
    /// The upstream's 429s.
    pub upstream_429: u64,
    /// Requests answered with each key (in the order of the pool's keys).
    pub per_key: Vec<u64>,
    /// The time the request limit alone allows: the first minute's capacity at once, then
    /// the refill rate (`(tasks − keys × RPM) / (keys × RPM / 60 s)`); with a raise, the
    /// old rate until it, then the extra capacity at once and the new rate (as
    /// `scripts/scale-bench.sh` computes it).
    pub ideal: Duration,
    /// With a raise: when the first answer carrying the raised limits arrived (the first
    /// request the upstream admitted under them, answered a latency later).
    pub raise_seen: Option<Duration>,
    /// With [`ScaleConfig::trace_every`]: the board's levels against the upstream's, per
    /// key, over the run.
    pub trace: Vec<LevelSample>,
}

/// The board's view of one key's buckets against the upstream's at one instant of a run
/// (see [`ScaleConfig::trace_every`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LevelSample {
    /// Since the start of the run.
    pub at: Duration,
    /// The key's index in the pool.
    pub key: usize,
    /// The board's remaining requests, input and output tokens (`None`: not known yet).
    pub board: [Option<u64>; 3],
    /// The upstream's levels (`None`: no request of the key reached it yet).
    pub server: Option<[u64; 3]>,
    /// Requests waiting in the board's queue of the key.
    pub queued: usize,
    /// The key's requests in flight, as the board counts them.
    pub in_flight: usize,
}

impl ScaleReport {
    /// `elapsed / ideal`.
    pub fn ratio(&self) -> f64 {
        self.elapsed.as_secs_f64() / self.ideal.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// The body of task `i` of the fleet `label` with `seed`: 100-500 input tokens as the
/// simulator counts them (3 bytes a token, plus about 26 for the request's structure),
/// `max_tokens` 300-1500, one user message.
///
/// ```
/// let body = tower_claude::testing::scale::fleet_task("claude-opus-4-5", "f1", 1, 0);
/// assert!(body.contains("\"max_tokens\""));
/// ```
pub fn fleet_task(model: &str, label: &str, seed: u64, i: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003) ^ i);
    let input = rng.u64(100..=500) - 26;
    let prompt = format!("{label} task {i:05} ") + &"x".repeat(input as usize * 3 - 12);
    serde_json::json!({
        "model": model,
        "max_tokens": rng.u64(300..=1500),
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string()
}

/// Runs the scenario (inside a runtime with paused time, or it takes real minutes).
pub async fn run(config: &ScaleConfig) -> ScaleReport {
    let mock = MockClaude::builder()
        .default_limits(config.limits)
        .output_tokens(config.output_tokens)
        .latency(config.latency, Duration::ZERO)
        .build();
    // The proxy's stack with `--cache false --fallback false` and the SDK retry strategy.
    let stack = StackConfig {
        cache: CacheConfig::Off,
        fallback: false,
        metrics: false,
        max_attempts: 3,
        max_retry_delay: Duration::from_secs(60),
        deadline: Some(Duration::from_secs(600)),
        seed: Some(1),
        ..StackConfig::default()
    };
    let names: Vec<String> = (1..=config.keys.max(1))
        .map(|k| format!("sk-ant-scale-{k}"))
        .collect();
    let pool = KeyPoolLayer::new(names.iter().map(String::as_str)).expect("non-empty keys");
    let stack = ClaudeStack::from_config(&stack)
        .expect("no file to open")
        .key_pool(Some(pool));
    let board = stack.quota_board().clone();
    let svc = stack.service(mock.clone());
    let start = Instant::now();
    let raise_seen = config.raise.map(|(after, to)| {
        let (mock, latency) = (mock.clone(), config.latency);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let before = mock.stats().accepted;
            mock.set_limits(to);
            // The first request admitted from now on carries the new limits in its answer.
            while mock.stats().accepted == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            start.elapsed() + latency
        })
    });
    let ids: Arc<Vec<_>> = Arc::new(
        names
            .iter()
            .map(|n| crate::anthropic::KeyId::from_api_key(n))
            .collect(),
    );
    let samples: Arc<std::sync::Mutex<Vec<LevelSample>>> = Arc::default();
    let tracer = config.trace_every.map(|every| {
        let (board, mock, ids) = (board, mock.clone(), ids.clone());
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for status in board.statuses() {
                    let Some(key) = ids.iter().position(|k| *k == status.key) else {
                        continue;
                    };
                    let left = |b: Option<crate::quota::BucketHeadroom>| b.map(|b| b.remaining);
                    let h = status.headroom;
                    let sample = LevelSample {
                        at: start.elapsed(),
                        key,
                        board: [
                            left(h.requests),
                            left(h.input_tokens),
                            left(h.output_tokens),
                        ],
                        server: mock
                            .levels(&status.key, &status.group)
                            .map(|l| l.map(|v| v.max(0.0).floor() as u64)),
                        queued: status.queue_depth,
                        in_flight: status.in_flight,
                    };
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(sample);
                }
            }
        })
    });
    let failed = Arc::new(AtomicU64::new(0));
    let per_key: Arc<Vec<AtomicU64>> = Arc::new(names.iter().map(|_| AtomicU64::new(0)).collect());
    let mut fleets = Vec::new();
    for f in 1..=names.len() as u64 {
        let next = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..config.concurrency.max(1) {
            let (svc, next, failed) = (svc.clone(), next.clone(), failed.clone());
            let (ids, per_key) = (ids.clone(), per_key.clone());
            let (tasks, seed) = (config.tasks_per_fleet, config.seed);
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= tasks {
                        return;
                    }
                    let seed = seed + f - 1;
                    let body = fleet_task("claude-opus-4-5", &format!("f{f}"), seed, i);
                    let req = http::Request::post("https://api.anthropic.com/v1/messages")
                        .header("content-type", "application/json")
                        .header("anthropic-version", "2023-06-01")
                        .body(RequestBody::from(body))
                        .expect("a valid request");
                    let ok = match svc.clone().oneshot(req).await {
                        Ok(res) if res.status().is_success() => {
                            let key = res.extensions().get::<ChosenKey>().map(ChosenKey::key);
                            if let Some(k) = key.and_then(|k| ids.iter().position(|i| i == k)) {
                                per_key[k].fetch_add(1, Ordering::Relaxed);
                            }
                            res.into_body().collect().await.is_ok()
                        }
                        _ => false,
                    };
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        fleets.push(tokio::spawn(async move {
            for w in workers {
                let _ = w.await;
            }
            start.elapsed()
        }));
    }
    let mut finish = Vec::new();
    for f in fleets {
        finish.push(f.await.unwrap_or_default());
    }
    if let Some(tracer) = tracer {
        tracer.abort();
    }
    let trace = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let raise_seen = match raise_seen {
        Some(watch) => watch.await.ok(),
        None => None,
    };
    let keys = names.len() as u64;
    let tasks = config.tasks_per_fleet * keys;
    let rpm = config.limits.rpm.max(1);
    let ideal = match config.raise {
        Some((after, to)) if to.rpm > rpm => {
            let (after, k) = (after.as_secs_f64(), keys as f64);
            let before = k * (rpm as f64 + after * rpm as f64 / 60.0);
            let left = (tasks as f64 - before - k * (to.rpm - rpm) as f64).max(0.0);
            after + left / (k * to.rpm as f64 / 60.0)
        }
        _ => tasks.saturating_sub(keys * rpm) as f64 / (keys as f64 * rpm as f64 / 60.0),
    };
    ScaleReport {
        elapsed: finish.iter().copied().max().unwrap_or_default(),
        fleets: finish,
        failed: failed.load(Ordering::Relaxed),
        upstream_429: mock.stats().rate_limited,
        per_key: per_key.iter().map(|n| n.load(Ordering::Relaxed)).collect(),
        ideal: Duration::from_secs_f64(ideal),
        raise_seen,
        trace,
    }
}
