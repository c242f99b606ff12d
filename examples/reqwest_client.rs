//! A plain `reqwest` client gets the stack's protection through `ClaudeMiddleware`.
//!
//! ```sh
//! cargo run --example reqwest_client --features reqwest,testing,client
//! ```
//!
//! The simulator is served on a loopback port with a quota of 60 requests a minute and 10 %
//! of answers overloaded (529). A burst of 64 requests from a bare `reqwest::Client` loses
//! some of them; the same burst through `reqwest_middleware` with `ClaudeMiddleware` (a
//! `ClaudeStack` around an HTTP client to the same server) loses none: the stack waits for
//! quota and retries the 529s. The requests are built the same way in both cases.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tower_claude::BoxError;
use tower_claude::client::HttpClient;
use tower_claude::reqwest::ClaudeMiddleware;
use tower_claude::retry::RetryInfo;
use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
use tower_claude::testing::{MockClaude, MockLimits};

const BURST: usize = 64;

fn body(i: usize) -> String {
    format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
    )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mock = MockClaude::builder()
        .default_limits(MockLimits {
            rpm: 60,
            itpm: 1_000_000,
            otpm: 1_000_000,
        })
        .overloaded_rate(0.1)
        .seed(7)
        .latency(Duration::from_millis(20), Duration::ZERO)
        .build();
    let (addr, server) = mock.serve_on_loopback().await?;
    let base = format!("http://{addr}");
    println!("simulator on {base}: 60 requests / minute per key, 10 % overloaded");

    // 1. A bare reqwest client: every refusal reaches the caller.
    let bare = reqwest::Client::new();
    let statuses: Vec<u16> = futures_util::stream::iter(0..BURST)
        .map(|i| {
            let request = bare
                .post(format!("{base}/v1/messages"))
                .header("x-api-key", "sk-ant-bare")
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .body(body(i));
            async move {
                request
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let lost = statuses.iter().filter(|s| **s != 200).count();
    println!("bare reqwest:             {lost:>2} of {BURST} requests failed (429 / 529)");

    // 2. The same client type, through the stack.
    let stack = ClaudeStack::from_config(&StackConfig {
        cache: CacheConfig::Off,
        ..StackConfig::default()
    })?;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(ClaudeMiddleware::new(
            stack.service(HttpClient::new(base.parse()?)),
        ))
        .build();
    let start = Instant::now();
    let results: Vec<(u16, u32)> = futures_util::stream::iter(0..BURST)
        .map(|i| {
            let request = client
                .post(format!("{base}/v1/messages"))
                .header("x-api-key", "sk-ant-through-the-stack")
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .body(body(i));
            async move {
                match request.send().await {
                    Ok(response) => {
                        let attempts = response
                            .extensions()
                            .get::<RetryInfo>()
                            .map_or(1, RetryInfo::attempts);
                        let status = response.status().as_u16();
                        // Read the whole answer, as a caller would.
                        let ok = response.text().await.is_ok();
                        (if ok { status } else { 0 }, attempts)
                    }
                    Err(err) => {
                        eprintln!("request {i} failed: {err}");
                        (0, 0)
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let lost = results.iter().filter(|(s, _)| *s != 200).count();
    let retried = results.iter().filter(|(_, a)| *a > 1).count();
    println!(
        "reqwest + ClaudeMiddleware: {lost:>2} of {BURST} requests failed ({retried} retried, {:.1} s)",
        start.elapsed().as_secs_f64()
    );
    let stats = mock.stats();
    println!(
        "upstream saw {} requests, {} refused for quota",
        stats.received, stats.rate_limited
    );
    server.abort();
    if lost > 0 {
        return Err(format!("{lost} requests failed through the stack").into());
    }
    Ok(())
}
