//! An axum service whose handlers call Claude through the tower-claude stack.
//!
//! ```sh
//! cargo run --example axum_app --features testing,client            # self-test, then exit
//! cargo run --example axum_app --features testing,client -- --serve # keep serving
//! ```
//!
//! `POST /summarize` with `{"text": "..."}` answers `{"summary": "...", "model": "..."}`.
//! Without `ANTHROPIC_API_KEY` the stack talks to the in-process simulator.
//!
//! Cache: `ClaudeStack::new()`'s default, 64 MiB in memory in mode `deterministic`: the
//! summaries are asked at the API's default temperature (sampled), so none is cached; ask with
//! `"temperature": 0` (or send `x-tower-claude-cache: use`) to have identical texts served from
//! the cache.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_claude::BoxError;
use tower_claude::body::RequestBody;
use tower_claude::stack::{ClaudeService, ClaudeStack};
use tower_claude::testing::MockClaude;

#[derive(Clone)]
struct AppState {
    claude: ClaudeService,
    api_key: String,
}

async fn summarize(
    State(state): State<AppState>,
    Json(input): Json<Value>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let text = input.get("text").and_then(Value::as_str).ok_or((
        StatusCode::BAD_REQUEST,
        "expected {\"text\": \"...\"}".to_owned(),
    ))?;
    let body = json!({
        "model": "claude-sonnet-4-6",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": format!("Summarize in one sentence:\n\n{text}")}],
    });
    let req = Request::post("/v1/messages")
        .header("x-api-key", &state.api_key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(RequestBody::from(body.to_string()))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // The stack waits for quota, retries 429/529 and falls back to a cheaper model if needed.
    let resp = state
        .claude
        .oneshot(req)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .to_bytes();
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    if !status.is_success() {
        return Err((StatusCode::BAD_GATEWAY, answer.to_string()));
    }
    let summary = answer["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok(Json(json!({"summary": summary, "model": answer["model"]})))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let stack = ClaudeStack::new();
    let (claude, api_key) = match std::env::var("ANTHROPIC_API_KEY") {
        Ok(key) if !key.is_empty() => (
            stack.service(tower_claude::client::HttpClient::anthropic()),
            key,
        ),
        _ => (
            stack.service(MockClaude::builder().build()),
            "sk-ant-local".to_owned(),
        ),
    };
    let app = Router::new()
        .route("/summarize", post(summarize))
        .with_state(AppState { claude, api_key });

    let serve = std::env::args().any(|a| a == "--serve");
    let listener = tokio::net::TcpListener::bind(if serve {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    })
    .await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if serve {
        server.await??;
        return Ok(());
    }

    // Self-test: call our own endpoint a few times over loopback HTTP, then exit.
    for text in [
        "Tower is a library of modular components for networking clients and servers.",
        "Token buckets refill continuously; fixed windows stall callers for up to a minute.",
    ] {
        let reply = call(addr, text).await?;
        println!("POST /summarize -> {reply}");
    }
    server.abort();
    Ok(())
}

async fn call(addr: SocketAddr, text: &str) -> Result<Value, BoxError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = Request::post(format!("http://{addr}/summarize"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"text": text}).to_string(),
        )))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)).into());
    }
    Ok(serde_json::from_slice(&body)?)
}
