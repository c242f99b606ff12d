//! The reqwest bridge over real HTTP: a `reqwest_middleware` client with `ClaudeMiddleware`
//! in front of a `ClaudeStack` whose `HttpClient` talks to the simulator served on loopback.
#![cfg(all(feature = "reqwest", feature = "testing", feature = "client"))]

use std::time::Duration;

use tower_claude::client::HttpClient;
use tower_claude::fallback::{NoFallback, ServedModel};
use tower_claude::reqwest::{BridgeError, BridgeErrorKind, ClaudeMiddleware};
use tower_claude::retry::{RetryError, RetryErrorKind, RetryInfo};
use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
use tower_claude::testing::{Fault, MockClaude};

const BODY: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":32,"messages":[{"role":"user","content":"hi"}]}"#;

async fn setup(mock: &MockClaude) -> (String, reqwest_middleware::ClientWithMiddleware) {
    let (addr, _server) = mock.serve_on_loopback().await.unwrap();
    let base = format!("http://{addr}");
    let stack = ClaudeStack::from_config(&StackConfig {
        cache: CacheConfig::Off,
        seed: Some(1),
        ..StackConfig::default()
    })
    .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(ClaudeMiddleware::new(
            stack.service(HttpClient::new(base.parse().unwrap())),
        ))
        .build();
    (base, client)
}

fn mock() -> MockClaude {
    MockClaude::builder()
        .latency(Duration::from_millis(5), Duration::ZERO)
        .build()
}

#[tokio::test]
async fn a_529_is_retried_and_the_answer_keeps_its_headers_body_and_extensions() {
    let mock = mock();
    mock.push_fault(Fault::Overloaded);
    let (base, client) = setup(&mock).await;
    let response = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Upstream headers reach the reqwest caller.
    assert!(response.headers().contains_key("request-id"));
    assert!(
        response
            .headers()
            .contains_key("anthropic-ratelimit-requests-limit")
    );
    assert_eq!(response.url().as_str(), format!("{base}/v1/messages"));
    let info = response.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.attempts(), 2, "the 529 was retried");
    let served = response.extensions().get::<ServedModel>().unwrap();
    assert_eq!(&*served.served, "claude-haiku-4-5");
    let body: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(mock.stats().received, 2);
}

#[tokio::test]
async fn a_streaming_answer_streams_through() {
    let mock = mock();
    let (base, client) = setup(&mock).await;
    let response = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(BODY.replace(r#""max_tokens":32"#, r#""max_tokens":32,"stream":true"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("event: message_start"), "{text}");
    assert!(text.contains("event: message_stop"), "{text}");
}

#[tokio::test]
async fn request_extensions_reach_the_stack() {
    // Opus is exhausted at once (spend cap on the first request): with `NoFallback` the
    // request must not move to Sonnet, so the caller sees the spend cap error.
    let mock = mock();
    mock.push_fault(Fault::SpendCap);
    let (base, client) = setup(&mock).await;
    let err = client
        .post(format!("{base}/v1/messages"))
        .with_extension(NoFallback)
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(BODY.replace("claude-haiku-4-5", "claude-opus-4-7"))
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("expected a middleware error, got {err:?}");
    };
    let bridge = err.downcast_ref::<BridgeError>().expect("a BridgeError");
    assert_eq!(bridge.kind(), BridgeErrorKind::Service);
    // The stack's error (here the fallback layer's, wrapping the retry layer's) is the source.
    let mut source = std::error::Error::source(bridge);
    let mut retry = None;
    while let Some(e) = source {
        retry = retry.or(e.downcast_ref::<RetryError>());
        source = e.source();
    }
    let retry = retry.expect("the stack's RetryError in the source chain");
    assert_eq!(retry.kind(), RetryErrorKind::SpendLimit);
    assert_eq!(mock.stats().received, 1, "no fallback to another model");

    // Without the extension the same fault moves the request to Sonnet.
    mock.push_fault(Fault::SpendCap);
    let response = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(BODY.replace("claude-haiku-4-5", "claude-opus-4-7"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = response.extensions().get::<ServedModel>().unwrap();
    assert_eq!(&*served.served, "claude-sonnet-4-6");
}

#[tokio::test]
async fn a_body_over_the_api_limit_is_a_typed_error_and_never_sent() {
    let mock = mock();
    let (base, client) = setup(&mock).await;
    let huge = vec![b'x'; tower_claude::body::ANTHROPIC_MAX_BODY + 1];
    let err = client
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .body(huge)
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("expected a middleware error, got {err:?}");
    };
    let bridge = err.downcast_ref::<BridgeError>().expect("a BridgeError");
    assert_eq!(bridge.kind(), BridgeErrorKind::Service);
    let source = std::error::Error::source(bridge).unwrap();
    assert!(
        source.is::<tower_claude::body::BufferBodyError>(),
        "{source}"
    );
    assert_eq!(mock.stats().received, 0);
}
