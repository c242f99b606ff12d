//! The main job: a batch of code-generation tasks through the full tower-claude stack.
//!
//! ```sh
//! cargo run --release --all-features --example codegen_batch
//! ```
//!
//! Without `ANTHROPIC_API_KEY` the batch runs against the built-in Claude simulator with a
//! tight quota, in simulated time (tokio's paused clock: minutes of quota pass in a moment),
//! first with a naive client that does what the official SDKs do (2 retries), then through
//! `ClaudeStack`. With `ANTHROPIC_API_KEY` set it runs the stack against the real API (a small
//! batch: `DEMO_TASKS` tasks, default 8, `max_tokens` 256).
//!
//! Answers are cached on disk in `.tower-claude/demo-cache.redb`, in cache mode
//! `deterministic` (the default: every task asks with `"temperature": 0`, so every answer is
//! cached; a sampled request would not be): run it twice and the second run is served from the
//! cache, except the answers a fallback model wrote (the model asked for has quota again in a
//! new run, and the cache never passes another model's answer off as its own). `DEMO_FRESH=1`
//! clears the cache first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{ApiError, ModelCatalog, Usage, header_names};
use tower_claude::body::RequestBody;
use tower_claude::cache::CacheMode;
use tower_claude::quota::Limits;
use tower_claude::retry::RetryInfo;
use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig, boxed};
use tower_claude::testing::{MockClaude, MockLimits};

const CACHE_PATH: &str = ".tower-claude/demo-cache.redb";
const PROJECTS: [&str; 4] = [
    "todo-service",
    "markdown-renderer",
    "rate-limiter",
    "chess-engine",
];
const MODULES: [&str; 4] = ["core", "utils", "api", "tests"];
const SLICES: usize = 3;
const WORKERS: usize = 16;

/// The simulated quota: per key and model group, per minute.
fn simulator() -> MockClaude {
    MockClaude::builder()
        .limits(
            "claude-opus-4",
            MockLimits {
                rpm: 12,
                itpm: 16_000,
                otpm: 4_000,
            },
        )
        .limits(
            "claude-sonnet-4",
            MockLimits {
                rpm: 20,
                itpm: 24_000,
                otpm: 6_000,
            },
        )
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: 30,
                itpm: 40_000,
                otpm: 10_000,
            },
        )
        .overloaded_rate(0.04)
        .seed(2026)
        .latency(Duration::from_millis(600), Duration::from_millis(8))
        .output_tokens(420)
        .build()
}

struct Task {
    name: String,
    body: String,
}

fn tasks(count: usize, model: &str, max_tokens: u32) -> Vec<Task> {
    let spec = "You write idiomatic, tested Rust. Follow the project's conventions: \
                one module per concern, typed errors, no unwrap in library code, doc comments \
                with examples on every public item. "
        .repeat(12);
    let mut out = Vec::new();
    'outer: for project in PROJECTS {
        for module in MODULES {
            for slice in 1..=SLICES {
                if out.len() == count {
                    break 'outer;
                }
                let prompt = format!(
                    "Project `{project}`: write part {slice} of {SLICES} of the `{module}` module. \
                     Return only the Rust code of that part."
                );
                let body = serde_json::json!({
                    "model": model,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "system": spec,
                    "messages": [{"role": "user", "content": prompt}],
                });
                out.push(Task {
                    name: format!("{project}/{module}#{slice}"),
                    body: body.to_string(),
                });
            }
        }
    }
    out
}

fn request(task: &Task, key: &str) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(RequestBody::from(task.body.clone()))
        .expect("a valid request")
}

#[derive(Default)]
struct Report {
    done: u64,
    failed: u64,
    failures: BTreeMap<String, u64>,
    retries: u64,
    served_by: BTreeMap<String, u64>,
    cache_hits: u64,
    output_tokens: u64,
}

impl Report {
    async fn record(
        &mut self,
        result: Result<Response<tower_claude::stack::ClaudeBody>, BoxError>,
    ) {
        let resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                self.failed += 1;
                *self.failures.entry(format!("error: {err}")).or_default() += 1;
                return;
            }
        };
        let status = resp.status();
        if let Some(info) = resp.extensions().get::<RetryInfo>() {
            self.retries += u64::from(info.attempts().saturating_sub(1));
        }
        let served = resp
            .headers()
            .get(header_names::X_TOWER_CLAUDE_MODEL)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let hit = resp
            .headers()
            .get(header_names::X_TOWER_CLAUDE_CACHE)
            .is_some_and(|v| v == "hit");
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(err) => {
                self.failed += 1;
                *self.failures.entry(format!("body: {err}")).or_default() += 1;
                return;
            }
        };
        if status.is_success() {
            self.done += 1;
            self.cache_hits += u64::from(hit);
            let model = served
                .or_else(|| model_of(&body))
                .unwrap_or_else(|| "?".into());
            *self.served_by.entry(model).or_default() += 1;
            self.output_tokens += Usage::from_json(&body).map_or(0, |u| u.output_tokens);
        } else {
            self.failed += 1;
            let err = ApiError::from_response(status, &body);
            *self
                .failures
                .entry(format!("{} {}", status.as_u16(), err.error_type()))
                .or_default() += 1;
        }
    }
}

fn model_of(body: &Bytes) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("model")?
        .as_str()
        .map(str::to_owned)
}

/// What the official SDKs do: 2 retries on 408/409/429/5xx, the server's delay honoured up to
/// 60 s, otherwise `min(0.5 * 2^n, 8)` s shortened by up to 25 % jitter.
async fn naive_call(
    mut svc: tower_claude::stack::ClaudeService,
    req: Request<RequestBody>,
    rng: &mut fastrand::Rng,
) -> Result<Response<tower_claude::stack::ClaudeBody>, BoxError> {
    let mut attempt = 0;
    loop {
        let resp = svc.ready().await?.call(clone_request(&req)).await?;
        let retryable = matches!(resp.status().as_u16(), 408 | 409 | 429 | 500..=599);
        if !retryable || attempt == 2 {
            return Ok(resp);
        }
        let server =
            tower_claude::anthropic::retry_after(resp.headers(), std::time::SystemTime::now())
                .filter(|d| *d <= Duration::from_secs(60));
        let backoff =
            Duration::from_secs_f64((0.5 * 2f64.powi(attempt)).min(8.0) * (1.0 - 0.25 * rng.f64()));
        tokio::time::sleep(server.unwrap_or(backoff)).await;
        attempt += 1;
    }
}

fn clone_request(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut out = Request::new(req.body().clone());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.headers_mut() = req.headers().clone();
    out
}

fn progress(len: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

async fn run_batch(
    label: &str,
    tasks: &[Task],
    key: &str,
    call: impl Fn(
        Request<RequestBody>,
    ) -> futures_util::future::BoxFuture<
        'static,
        Result<Response<tower_claude::stack::ClaudeBody>, BoxError>,
    >,
) -> (Report, Duration) {
    let bar = progress(tasks.len(), label);
    let start = Instant::now();
    let mut report = Report::default();
    let mut results = futures_util::stream::iter(tasks.iter().map(|t| {
        bar.set_message(t.name.clone());
        call(request(t, key))
    }))
    .buffer_unordered(WORKERS);
    while let Some(result) = results.next().await {
        report.record(result).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    (report, start.elapsed())
}

fn print_report(
    title: &str,
    report: &Report,
    elapsed: Duration,
    upstream: Option<&tower_claude::testing::MockStats>,
    simulated: bool,
) {
    println!("\n{title}");
    println!("  tasks done            {:>6}", report.done);
    println!("  tasks failed          {:>6}", report.failed);
    for (why, n) in &report.failures {
        println!("    {n:>4} x {why}");
    }
    if let Some(stats) = upstream {
        println!("  upstream requests     {:>6}", stats.received);
        println!(
            "  upstream 429s         {:>6}",
            stats.by_status.get(&429).copied().unwrap_or(0)
        );
        println!(
            "  upstream 529s         {:>6}",
            stats.by_status.get(&529).copied().unwrap_or(0)
        );
    }
    println!("  retries               {:>6}", report.retries);
    println!("  cache hits            {:>6}", report.cache_hits);
    for (model, n) in &report.served_by {
        println!("  served by {model:<20} {n:>4}");
    }
    if elapsed >= Duration::from_secs(1) {
        println!(
            "  output tokens         {:>6}   ({:.0} per minute)",
            report.output_tokens,
            report.output_tokens as f64 / elapsed.as_secs_f64() * 60.0
        );
    } else {
        println!("  output tokens         {:>6}", report.output_tokens);
    }
    println!(
        "  {}          {:>6.1} s",
        if simulated {
            "simulated time"
        } else {
            "wall time     "
        },
        elapsed.as_secs_f64()
    );
}

async fn simulated() -> Result<(), BoxError> {
    let tasks = tasks(
        PROJECTS.len() * MODULES.len() * SLICES,
        "claude-opus-4-7",
        1024,
    );
    println!(
        "codegen batch: {} tasks (4 projects x core/utils/api/tests x {SLICES} slices), {WORKERS} at a time",
        tasks.len()
    );
    println!(
        "simulated Claude quota per minute: Opus 12 req / 16k in / 4k out; Sonnet 20 / 24k / 6k; Haiku 30 / 40k / 10k; 4 % of answers 529"
    );

    // 1. A naive client: what the official SDKs do.
    let mock = simulator();
    let upstream = boxed(mock.clone());
    let rng = Arc::new(std::sync::Mutex::new(fastrand::Rng::with_seed(7)));
    let (naive, naive_time) = run_batch("naive", &tasks, "sk-demo", |req| {
        let svc = upstream.clone();
        let rng = rng.clone();
        Box::pin(async move {
            let mut local = fastrand::Rng::with_seed(rng.lock().expect("rng").u64(..));
            naive_call(svc, req, &mut local).await
        })
    })
    .await;
    let mut naive = naive;
    // The naive loop has no RetryInfo: its retries are the upstream calls beyond one per task.
    naive.retries = mock.stats().received.saturating_sub(tasks.len() as u64);
    print_report(
        "naive client (2 retries, like the official SDKs)",
        &naive,
        naive_time,
        Some(&mock.stats()),
        true,
    );

    // 2. The same batch through ClaudeStack.
    let mock = simulator();
    let stack = demo_stack()?;
    let svc = stack.service(mock.clone());
    let (report, elapsed) = run_batch("tower-claude", &tasks, "sk-demo", |req| {
        Box::pin(svc.clone().oneshot(req))
    })
    .await;
    // Answers are stored after delivery, in the background: let the last ones land on disk.
    if let Some(cache) = stack.cache_layer() {
        cache.flush().await;
    }
    print_report(
        "tower-claude ClaudeStack",
        &report,
        elapsed,
        Some(&mock.stats()),
        true,
    );
    print_utilisation(&mock.stats(), elapsed);
    if report.cache_hits == report.done && report.done > 0 {
        println!(
            "\nEvery answer came from the disk cache ({CACHE_PATH}); DEMO_FRESH=1 starts over."
        );
    } else if report.cache_hits > 0 {
        println!(
            "\n{} answers came from the disk cache ({CACHE_PATH}). The other {} were written by \
             a fallback model in an earlier run: the cache serves another model's answer only \
             while fallback would choose that model, and the model asked for has quota now.",
            report.cache_hits,
            report.done - report.cache_hits
        );
    } else {
        println!("\nRun it again: the answers are now in the disk cache ({CACHE_PATH}).");
    }
    if report.failed > 0 {
        return Err(format!("{} tasks failed", report.failed).into());
    }
    Ok(())
}

fn print_utilisation(stats: &tower_claude::testing::MockStats, elapsed: Duration) {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let limits = [
        ("claude-opus-4", 4_000.0),
        ("claude-sonnet-4", 6_000.0),
        ("claude-haiku-4-5", 10_000.0),
    ];
    for (group, otpm) in limits {
        let used = stats.output_tokens.get(group).copied().unwrap_or(0) as f64;
        if used > 0.0 {
            // Available: a full bucket at the start plus the refill over the run.
            let available = otpm * (1.0 + minutes);
            println!(
                "  quota use {group:<17} {:>5.1} % of output tokens available during the run",
                used / available * 100.0
            );
        }
    }
}

fn demo_stack() -> Result<ClaudeStack, BoxError> {
    if std::env::var_os("DEMO_FRESH").is_some() {
        let _ = std::fs::remove_file(CACHE_PATH);
    }
    let mut limits = BTreeMap::new();
    if std::env::var_os("ANTHROPIC_API_KEY").is_none() {
        // The demo knows the simulator's limits; leave this empty to learn them from headers.
        limits.insert(
            "claude-opus-4".to_owned(),
            Limits {
                rpm: 12,
                itpm: 16_000,
                otpm: 4_000,
            },
        );
        limits.insert(
            "claude-sonnet-4".to_owned(),
            Limits {
                rpm: 20,
                itpm: 24_000,
                otpm: 6_000,
            },
        );
        limits.insert(
            "claude-haiku-4-5".to_owned(),
            Limits {
                rpm: 30,
                itpm: 40_000,
                otpm: 10_000,
            },
        );
    }
    ClaudeStack::from_config(&StackConfig {
        limits,
        deadline: Some(Duration::from_secs(30 * 60)),
        seed: Some(11),
        cache: CacheConfig::Disk {
            path: CACHE_PATH.into(),
            max_bytes: 64 << 20,
        },
        // Stated rather than left to the default: the tasks are deterministic (temperature 0).
        cache_mode: CacheMode::Deterministic,
        catalog: ModelCatalog::default(),
        ..StackConfig::default()
    })
}

async fn real(key: String) -> Result<(), BoxError> {
    let count = std::env::var("DEMO_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let tasks = tasks(count, "claude-sonnet-4-6", 256);
    println!(
        "codegen batch against the real API: {} tasks, {WORKERS} at a time",
        tasks.len()
    );
    let stack = demo_stack()?;
    let svc = stack.service(tower_claude::client::HttpClient::anthropic());
    let (report, elapsed) = run_batch("tower-claude", &tasks, &key, |req| {
        Box::pin(svc.clone().oneshot(req))
    })
    .await;
    if let Some(cache) = stack.cache_layer() {
        cache.flush().await;
    }
    print_report(
        "tower-claude ClaudeStack (real API)",
        &report,
        elapsed,
        None,
        false,
    );
    if report.failed > 0 {
        return Err(format!("{} tasks failed", report.failed).into());
    }
    Ok(())
}

fn main() {
    let key = std::env::var("ANTHROPIC_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let result = match key {
        Some(key) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(real(key)),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a tokio runtime")
            .block_on(simulated()),
    };
    if let Err(err) = result {
        eprintln!("codegen_batch: {err}");
        std::process::exit(1);
    }
}
