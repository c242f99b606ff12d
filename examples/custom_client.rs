//! Compose your own Claude client from the layers you choose, one by one, in a
//! `tower::ServiceBuilder` around a hyper-util client.
//!
//! ```sh
//! cargo run --example custom_client --features testing,client
//! ```
//!
//! Without `ANTHROPIC_API_KEY` it starts the simulator on a loopback port and talks to it over
//! real HTTP; with the key it calls `https://api.anthropic.com`.

use std::time::Duration;

use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::Usage;
use tower_claude::body::RequestBody;
use tower_claude::client::HttpClient;
use tower_claude::concurrency::ConcurrencyLayer;
use tower_claude::quota::QuotaBoard;
use tower_claude::rate_limit::{QueueWait, RateLimitLayer};
use tower_claude::retry::{RetryInfo, RetryLayer};
use tower_claude::testing::{MockClaude, MockLimits};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (base, key, mock) = match std::env::var("ANTHROPIC_API_KEY") {
        Ok(key) if !key.is_empty() => ("https://api.anthropic.com".to_owned(), key, None),
        _ => {
            // A simulator with a small quota: 30 requests a minute.
            let mock = MockClaude::builder()
                .default_limits(MockLimits {
                    rpm: 30,
                    itpm: 100_000,
                    otpm: 20_000,
                })
                .latency(Duration::from_millis(20), Duration::ZERO)
                .build();
            let (addr, _server) = mock.serve_on_loopback().await?;
            (
                format!("http://{addr}"),
                "sk-ant-local-test".to_owned(),
                Some(mock),
            )
        }
    };

    // One board: the rate limiter writes it, and we read it at the end.
    let board = QuotaBoard::new();
    let client = ServiceBuilder::new()
        // Outermost: retry 429 / 529 / 5xx with the server's delays, at most 4 attempts.
        .layer(
            RetryLayer::new()
                .max_attempts(4)
                .deadline(Duration::from_secs(120)),
        )
        // Then wait locally for quota learned from the response headers.
        .layer(RateLimitLayer::new().board(board.clone()))
        // Then at most 4 requests in flight.
        .layer(ConcurrencyLayer::new(4))
        .service(HttpClient::new(base.parse()?));

    let n = 33; // above the simulator's 30 requests a minute: the limiter waits for refill
    let started = std::time::Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let key = key.clone();
            async move {
                let body = format!(
                    r#"{{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{{"role":"user","content":"Name a Rust crate, #{i}"}}]}}"#
                );
                let req = Request::post("/v1/messages")
                    .header("x-api-key", key)
                    .header("anthropic-version", "2023-06-01")
                    .header("content-type", "application/json")
                    .body(RequestBody::from(body))?;
                let resp = client.oneshot(req).await?;
                let status = resp.status();
                let waited = resp.extensions().get::<QueueWait>().map_or(Duration::ZERO, |w| w.0);
                let attempts = resp.extensions().get::<RetryInfo>().map_or(1, |r| r.attempts());
                let body = resp.into_body().collect().await?.to_bytes();
                let tokens = Usage::from_json(&body).map_or(0, |u| u.output_tokens);
                Ok::<_, BoxError>((status, waited, attempts, tokens))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    let mut ok = 0;
    let mut max_wait = Duration::ZERO;
    for r in &results {
        match r {
            Ok((status, waited, _, _)) if status.is_success() => {
                ok += 1;
                max_wait = max_wait.max(*waited);
            }
            Ok((status, ..)) => println!("request answered {status}"),
            Err(err) => println!("request failed: {err}"),
        }
    }
    println!(
        "{ok}/{n} requests succeeded in {:.1} s; longest local wait for quota {:.1} s",
        started.elapsed().as_secs_f64(),
        max_wait.as_secs_f64()
    );
    if let Some(mock) = mock {
        let stats = mock.stats();
        println!(
            "the simulator saw {} requests, {} of them over its limit (429)",
            stats.received, stats.rate_limited
        );
    }
    for s in board.statuses() {
        println!(
            "key {} / {}: {:.0} % of the binding limit left",
            s.key,
            s.group,
            s.headroom.fraction * 100.0
        );
    }
    if ok != n {
        return Err("some requests failed".into());
    }
    Ok(())
}
