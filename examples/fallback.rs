//! Model fallback against the in-process simulator: 60 Opus tasks, 6 at a time, with a
//! tier-1-like Opus quota. The layer moves tasks to Sonnet and Haiku as the Opus quota drops,
//! and back to Opus as it refills.
//!
//! ```text
//! cargo run --example fallback --features testing
//! ```
//!
//! Time is tokio's paused clock, so the simulated minutes pass in milliseconds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::body::RequestBody;
use tower_claude::fallback::{FallbackLayer, ServedModel};
use tower_claude::testing::{MockClaude, MockLimits};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    let mock = MockClaude::builder()
        .limits("claude-opus-4-7", MockLimits::new(50, 30_000, 8_000))
        .limits("claude-sonnet-4-6", MockLimits::new(50, 30_000, 8_000))
        .limits("claude-haiku-4-5", MockLimits::new(50, 50_000, 10_000))
        .latency(Duration::from_millis(800), Duration::from_millis(5))
        .output_tokens(300)
        .build();
    let client = ServiceBuilder::new()
        .layer(FallbackLayer::new().thresholds(0.70, 0.30))
        .service(mock.clone());

    let start = tokio::time::Instant::now();
    let served: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let next = Arc::new(Mutex::new(0u32));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (client, served, next) = (client.clone(), served.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let task = {
                    let mut n = next.lock().unwrap();
                    if *n == 60 {
                        return Ok::<_, BoxError>(());
                    }
                    *n += 1;
                    *n
                };
                loop {
                    let body = format!(
                        r#"{{"model":"claude-opus-4-7","max_tokens":1024,"messages":[{{"role":"user","content":"Task {task}: summarise this paragraph."}}]}}"#
                    );
                    let request = http::Request::post("https://api.anthropic.com/v1/messages")
                        .header("x-api-key", "sk-ant-example")
                        .header("anthropic-version", "2023-06-01")
                        .body(RequestBody::from(body))?;
                    let response = client.clone().oneshot(request).await?;
                    let status = response.status();
                    let model = response.extensions().get::<ServedModel>().cloned();
                    let wait = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(1);
                    response.into_body().collect().await?;
                    if status.is_success() {
                        if let Some(model) = model {
                            *served.lock().unwrap().entry(model.served.to_string()).or_default() += 1;
                        }
                        break;
                    }
                    // A short 429 is returned by the layer: wait as the server asks.
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let stats = mock.stats();
    println!(
        "60 tasks in {:.1} s (simulated)",
        start.elapsed().as_secs_f64()
    );
    for (model, n) in served.lock().unwrap().iter() {
        println!("  {model:<20} {n:>3} tasks");
    }
    println!(
        "  upstream requests: {}, upstream 429s: {}",
        stats.received,
        stats.by_status.get(&429).copied().unwrap_or(0)
    );
    Ok(())
}
