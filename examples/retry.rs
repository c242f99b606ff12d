//! `RetryLayer` around the in-process simulator: a batch of 200 tasks on 8 workers against a
//! quota of 60 requests per minute with 10 % of requests overloaded (529).
//!
//! Runs on tokio's paused clock, so the minutes of simulated waiting take a moment:
//!
//! ```text
//! cargo run --example retry --features testing
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_claude::BoxError;
use tower_claude::body::RequestBody;
use tower_claude::retry::{Deadline, RetryError, RetryInfo, RetryLayer, RetryOutcome};
use tower_claude::testing::{MockClaude, MockLimits};

const TASKS: usize = 200;
const WORKERS: usize = 8;

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    let upstream = MockClaude::builder()
        .limits(
            "claude-sonnet-4-6",
            MockLimits {
                rpm: 60,
                itpm: 200_000,
                otpm: 40_000,
            },
        )
        .overloaded_rate(0.1)
        .latency(Duration::from_millis(300), Duration::from_millis(5))
        .output_tokens(120)
        .seed(1)
        .build();
    let client = RetryLayer::new()
        .max_attempts(8)
        .deadline(Duration::from_secs(15 * 60))
        .layer(upstream.clone());

    let next = Arc::new(AtomicUsize::new(0));
    let (done, lost) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let retried = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            let (done, lost, retried) = (done.clone(), lost.clone(), retried.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= TASKS {
                        return;
                    }
                    let body = format!(
                        r#"{{"model":"claude-sonnet-4-6","max_tokens":200,"stream":{},"messages":[{{"role":"user","content":"Task {i}"}}]}}"#,
                        i % 2 == 0
                    );
                    let mut request = Request::post("http://localhost/v1/messages")
                        .header("x-api-key", "sk-ant-example")
                        .header("anthropic-version", "2023-06-01")
                        .body(RequestBody::from(body))
                        .expect("a valid request");
                    // This task may take up to 10 minutes (overrides the layer's 15).
                    request
                        .extensions_mut()
                        .insert(Deadline::after(Duration::from_secs(600)));
                    match client.clone().oneshot(request).await {
                        Ok(response) => {
                            let info = response.extensions().get::<RetryInfo>().cloned();
                            let ok = response.status().is_success();
                            let complete = response.into_body().collect().await.is_ok();
                            if let Some(info) = info {
                                retried.fetch_add(info.attempts() - 1, Ordering::SeqCst);
                                if info.outcome() != RetryOutcome::Success {
                                    println!("task {i}: gave up: {:?}, {:?}", info.outcome(), info.last_error_message());
                                }
                            }
                            if ok && complete {
                                done.fetch_add(1, Ordering::SeqCst);
                            } else {
                                lost.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(err) => {
                            match err.downcast_ref::<RetryError>() {
                                Some(e) => println!("task {i}: {e}"),
                                None => println!("task {i}: {err}"),
                            }
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let stats = upstream.stats();
    println!(
        "{} done, {} lost, {} retries, in {:.0?} of simulated time; upstream saw {} requests: {:?}",
        done.load(Ordering::SeqCst),
        lost.load(Ordering::SeqCst),
        retried.load(Ordering::SeqCst),
        start.elapsed(),
        stats.received,
        stats.by_status,
    );
    Ok(())
}
