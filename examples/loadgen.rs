//! A small load generator for `claude-proxy`, and the fast upstream to measure it against.
//!
//! ```text
//! # a simulator with no latency and limits that never bind (the "upstream")
//! cargo run --release --features proxy --example loadgen -- mock --listen 127.0.0.1:9000
//! # the proxy in front of it
//! cargo run --release --features proxy --bin claude-proxy -- --upstream http://127.0.0.1:9000
//! # load: directly, then through the proxy
//! cargo run --release --features proxy --example loadgen -- run --url http://127.0.0.1:9000 -c 32 -d 10s
//! cargo run --release --features proxy --example loadgen -- run --url http://127.0.0.1:8787 -c 32 -d 10s
//! ```
//!
//! `run` keeps `--connections` requests in flight (one per connection, HTTP/1.1 keep-alive) for
//! a warm-up and then `--duration` (or until `--requests` have been sent), and prints the
//! latency percentiles (to the last byte of the body; for streams also to the first byte) and
//! the throughput of the measured part. Every request has a distinct prompt unless
//! `--same-body` is given, so a caching proxy serves none of them from its cache. A request
//! counts as an error when it fails, its status is not 200, or its stream does not end with
//! `message_stop`. See `docs/benchmarks.md` ("Proxy overhead") for the numbers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_claude::BoxError;
use tower_claude::proxy::parse_duration;
use tower_claude::testing::scale::fleet_task;
use tower_claude::testing::{MockClaude, MockLimits};

#[derive(Debug, Parser)]
#[command(
    about = "Load generator for claude-proxy, and a zero-latency simulator to measure it against."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the simulator over HTTP/1.1 with no latency and limits that never bind.
    Mock {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Output tokens of every answer (capped by the request's max_tokens).
        #[arg(long, default_value_t = 100)]
        output_tokens: u64,
        /// Per-key limits `RPM,ITPM,OTPM` (per key and model group; default: never binding).
        #[arg(long, value_parser = limits)]
        limits: Option<MockLimits>,
        /// Latency of every answer.
        #[arg(long, default_value = "0ms", value_parser = duration)]
        latency: Duration,
        /// Change the limits to `--raise-to` this long after the first request.
        #[arg(long, value_parser = duration)]
        raise_after: Option<Duration>,
        /// The limits after `--raise-after`, `RPM,ITPM,OTPM`.
        #[arg(long, value_parser = limits)]
        raise_to: Option<MockLimits>,
    },
    /// A fleet of concurrent clients working through a fixed number of tasks (a batch job):
    /// prints one JSON line with the tasks done and failed and the time it took.
    Fleet(FleetArgs),
    /// Send Messages requests to a base URL and report latency and throughput.
    Run(RunArgs),
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Base URL (the simulator, or the proxy); `/v1/messages` is appended.
    #[arg(long)]
    url: String,
    /// Requests in flight at once, one per connection.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// How long to measure, e.g. 10s, 1m.
    #[arg(long, short = 'd', default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Stop after this many measured requests (before the duration if it comes first).
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Load before measuring, not counted (connections opened, caches warm).
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
    /// Streaming requests (`"stream": true`, SSE answers).
    #[arg(long)]
    stream: bool,
    /// Model of the requests.
    #[arg(long, default_value = "claude-haiku-4-5")]
    model: String,
    /// `max_tokens` of the requests.
    #[arg(long, default_value_t = 100)]
    max_tokens: u64,
    /// Send the same body every time (through a caching proxy: cache hits).
    #[arg(long)]
    same_body: bool,
    /// `temperature` of the requests (none by default: the API's 1.0, which a proxy in cache
    /// mode `deterministic` does not cache; `0` makes them cacheable there).
    #[arg(long)]
    temperature: Option<f64>,
    /// Pad each prompt to about this many bytes (e.g. 2000 for 2 KB requests).
    #[arg(long, default_value_t = 0)]
    prompt_bytes: usize,
    /// The `x-api-key` sent.
    #[arg(long, default_value = "sk-ant-loadgen")]
    api_key: String,
    /// Print the result as one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Args)]
struct FleetArgs {
    /// Base URL (a proxy); `/v1/messages` is appended.
    #[arg(long)]
    url: String,
    /// Tasks to run.
    #[arg(long, default_value_t = 200)]
    tasks: u64,
    /// Tasks in flight at once.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Model of every task.
    #[arg(long, default_value = "claude-opus-4-5")]
    model: String,
    /// Start at this Unix time in milliseconds (fleets started together), else now.
    #[arg(long)]
    start_at_ms: Option<u64>,
    /// Seed of the task sizes (100-500 input tokens, max_tokens 300-1500).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Name printed with the result.
    #[arg(long, default_value = "fleet")]
    label: String,
    /// Give up on a task after this long.
    #[arg(long, default_value = "300s", value_parser = duration)]
    timeout: Duration,
}

fn limits(s: &str) -> Result<MockLimits, String> {
    let parts: Vec<u64> = s
        .split(',')
        .map(|p| p.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e} (expected RPM,ITPM,OTPM)"))?;
    match parts[..] {
        [rpm, itpm, otpm] => Ok(MockLimits::new(rpm, itpm, otpm)),
        _ => Err(format!("`{s}`: expected RPM,ITPM,OTPM")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration (e.g. 500ms, 10s, 1m)"))
}

/// At most this many latencies are kept (a bound on memory; about 80 MB).
const MAX_SAMPLES: usize = 10_000_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    match Cli::parse().command {
        Command::Mock {
            listen,
            output_tokens,
            limits,
            latency,
            raise_after,
            raise_to,
        } => {
            let raise = raise_after.zip(raise_to);
            serve_mock(listen, output_tokens, limits, latency, raise).await
        }
        Command::Fleet(args) => fleet(args).await,
        Command::Run(args) => {
            let report = run(args.clone()).await?;
            report.print(&args);
            if report.errors > 0 {
                return Err(format!("{} request(s) failed", report.errors).into());
            }
            Ok(())
        }
    }
}

async fn serve_mock(
    listen: SocketAddr,
    output_tokens: u64,
    limits: Option<MockLimits>,
    latency: Duration,
    raise: Option<(Duration, MockLimits)>,
) -> Result<(), BoxError> {
    let never_binding = MockLimits::new(1_000_000_000, 1_000_000_000_000, 1_000_000_000_000);
    let mock = MockClaude::builder()
        .default_limits(limits.unwrap_or(never_binding))
        .output_tokens(output_tokens)
        .latency(latency, Duration::ZERO)
        .build();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "simulator listening on http://{} ({latency:?} latency, {output_tokens} output tokens, limits {limits:?})",
        listener.local_addr()?
    );
    if let Some((after, to)) = raise {
        // The raise counts from the first request.
        let mock = mock.clone();
        tokio::spawn(async move {
            while mock.stats().received == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(after).await;
            let before = mock.stats().accepted;
            mock.set_limits(to);
            let raised = tokio::time::Instant::now();
            eprintln!("simulator: limits raised to {to:?}");
            // The first request admitted from now on is the first answer to carry the new
            // limits (its headers are the bucket's state when it was admitted).
            while mock.stats().accepted == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            eprintln!(
                "simulator: first request under the raised limits admitted {:.3} s after the raise",
                raised.elapsed().as_secs_f64()
            );
        });
    }
    tokio::select! {
        served = mock.serve(listener) => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    let stats = mock.stats();
    eprintln!(
        "simulator: {} requests received, {} accepted, {} refused with 429, statuses {:?}",
        stats.received, stats.accepted, stats.rate_limited, stats.by_status
    );
    Ok(())
}

/// Runs `--tasks` tasks, `--connections` at a time, and prints one JSON line.
async fn fleet(args: FleetArgs) -> Result<(), BoxError> {
    let uri: http::Uri = format!("{}/v1/messages", args.url.trim_end_matches('/')).parse()?;
    let client: LoadClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections)
        .build(HttpConnector::new());
    if let Some(at) = args.start_at_ms {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms))).await;
    }
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (client, uri, args) = (client.clone(), uri.clone(), args.clone());
        let (next, ok, failed) = (next.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.tasks {
                    return;
                }
                // 100-500 input tokens as the simulator counts them, max_tokens 300-1500.
                let body = fleet_task(&args.model, &args.label, args.seed, i);
                let req = Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("anthropic-version", "2023-06-01")
                    .body(Full::new(Bytes::from(body)));
                let done = async {
                    let res = client.request(req?).await?;
                    let status = res.status();
                    res.into_body().collect().await?;
                    Ok::<_, BoxError>(status)
                };
                match tokio::time::timeout(args.timeout, done).await {
                    Ok(Ok(StatusCode::OK)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    println!(
        "{}",
        serde_json::json!({
            "label": args.label,
            "ok": ok.load(Ordering::Relaxed),
            "failed": failed.load(Ordering::Relaxed),
            "elapsed_s": start.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// What one worker measured.
#[derive(Default)]
struct Samples {
    /// Microseconds to the last byte.
    total: Vec<u32>,
    /// Microseconds to the response head (first byte).
    head: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

struct Report {
    total: Vec<u32>,
    head: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

type LoadClient = Client<HttpConnector, Full<Bytes>>;

async fn run(args: RunArgs) -> Result<Report, BoxError> {
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let uri: http::Uri = format!("{}/v1/messages", args.url.trim_end_matches('/')).parse()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: LoadClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections)
        .build(connector);
    // Distinct prompts across runs too, so that a disk cache does not serve a second run.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let counter = Arc::new(AtomicU64::new(0));
    let ctx = Arc::new(Ctx {
        client,
        uri,
        args: args.clone(),
        nonce,
        counter,
    });

    if !args.warmup.is_zero() {
        phase(&ctx, Instant::now() + args.warmup, None).await;
    }
    let start = Instant::now();
    let samples = phase(&ctx, start + args.duration, args.requests).await;
    let elapsed = start.elapsed();

    let mut report = Report {
        total: Vec::new(),
        head: Vec::new(),
        errors: 0,
        first_error: None,
        elapsed,
    };
    for s in samples {
        report.total.extend(s.total);
        report.head.extend(s.head);
        report.errors += s.errors;
        report.first_error = report.first_error.or(s.first_error);
    }
    report.total.sort_unstable();
    report.head.sort_unstable();
    Ok(report)
}

struct Ctx {
    client: LoadClient,
    uri: http::Uri,
    args: RunArgs,
    nonce: u128,
    counter: Arc<AtomicU64>,
}

/// Runs `connections` workers until `until`, or until `limit` requests have been started.
async fn phase(ctx: &Arc<Ctx>, until: Instant, limit: Option<u64>) -> Vec<Samples> {
    let started = Arc::new(AtomicU64::new(0));
    let per_worker = MAX_SAMPLES / ctx.args.connections;
    let workers: Vec<_> = (0..ctx.args.connections)
        .map(|_| {
            let ctx = ctx.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while Instant::now() < until
                    && limit.is_none_or(|n| started.fetch_add(1, Ordering::Relaxed) < n)
                {
                    let i = ctx.counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match one_request(&ctx, i).await {
                        Ok(head) => {
                            if samples.total.len() < per_worker {
                                samples.total.push(micros(t0.elapsed()));
                                samples.head.push(micros(head));
                            }
                        }
                        Err(e) => {
                            samples.errors += 1;
                            samples.first_error.get_or_insert_with(|| chain(&*e));
                        }
                    }
                }
                samples
            })
        })
        .collect();
    let mut out = Vec::with_capacity(workers.len());
    for w in workers {
        out.push(w.await.unwrap_or_default());
    }
    out
}

/// An error and its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Sends request `i`, reads the whole answer; returns the time to the response head.
async fn one_request(ctx: &Ctx, i: u64) -> Result<Duration, BoxError> {
    let args = &ctx.args;
    let mut prompt = if args.same_body {
        "loadgen: write a haiku about queues".to_owned()
    } else {
        format!("loadgen {} #{i}: write a haiku about queues", ctx.nonce)
    };
    if prompt.len() < args.prompt_bytes {
        prompt.push(' ');
        prompt.extend(std::iter::repeat_n('q', args.prompt_bytes - prompt.len()));
    }
    let mut body = serde_json::json!({
        "model": args.model,
        "max_tokens": args.max_tokens,
        "stream": args.stream,
        "messages": [{"role": "user", "content": prompt}],
    });
    if let Some(t) = args.temperature {
        body["temperature"] = serde_json::json!(t);
    }
    let req = Request::post(ctx.uri.clone())
        .header("x-api-key", &args.api_key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let t0 = Instant::now();
    let resp = ctx.client.request(req).await?;
    let head = t0.elapsed();
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!("status {status}: {text}").into());
    }
    let tail = &body[body.len().saturating_sub(64)..];
    if args.stream && !tail.windows(12).any(|w| w == b"message_stop") {
        return Err("the stream did not end with message_stop".into());
    }
    Ok(head)
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1000.0
}

impl Report {
    fn print(&self, args: &RunArgs) {
        let ok = self.total.len();
        let rps = ok as f64 / self.elapsed.as_secs_f64();
        let mean = if ok == 0 {
            f64::NAN
        } else {
            self.total.iter().map(|&v| f64::from(v)).sum::<f64>() / ok as f64 / 1000.0
        };
        let kind = if args.stream { "stream" } else { "json" };
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "url": args.url, "kind": kind, "connections": args.connections,
                    "requests": ok, "errors": self.errors, "seconds": self.elapsed.as_secs_f64(),
                    "rps": rps, "mean_ms": mean,
                    "p50_ms": pct(&self.total, 50.0), "p90_ms": pct(&self.total, 90.0),
                    "p99_ms": pct(&self.total, 99.0), "max_ms": pct(&self.total, 100.0),
                    "head_p50_ms": pct(&self.head, 50.0), "head_p99_ms": pct(&self.head, 99.0),
                })
            );
            return;
        }
        println!(
            "{} {kind}, {} connections: {ok} requests in {:.2} s, {} errors",
            args.url,
            args.connections,
            self.elapsed.as_secs_f64(),
            self.errors
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        println!("  throughput  {rps:.0} req/s");
        println!(
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {mean:.3}",
            pct(&self.total, 50.0),
            pct(&self.total, 90.0),
            pct(&self.total, 99.0),
            pct(&self.total, 100.0),
        );
        if args.stream {
            println!(
                "  first byte  p50 {:.3}  p99 {:.3}",
                pct(&self.head, 50.0),
                pct(&self.head, 99.0)
            );
        }
    }
}
