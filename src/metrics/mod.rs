//! Observability: [`MetricsLayer`] (Prometheus-ready metrics on the `metrics` facade, a
//! tracing span per request), [`prometheus`] (the exporter and text rendering), [`alerts`]
//! (quota utilisation alerts to callbacks and webhooks), [`forecast`] (Holt demand forecasts)
//! and [`pacing`] (predictive throttling).
//!
//! [`MetricsLayer`] is the outermost layer of the stack: it sees what the caller sees. For
//! every `POST /v1/messages` it records, when the response body ends (streams are forwarded
//! as they come, never buffered):
//!
//! * [`tower_claude_requests_total`](names::REQUESTS_TOTAL) by model, status and outcome, and
//!   [`tower_claude_request_duration_seconds`](names::REQUEST_DURATION_SECONDS);
//! * tokens from the response's `usage` (JSON) or its `message_start` / `message_delta`
//!   events (SSE), by model and group;
//! * from the response head: retries ([`RetryInfo`](crate::retry::RetryInfo)), fallbacks
//!   ([`ServedModel`](crate::fallback::ServedModel) or `x-tower-claude-model`), cache decisions (`x-tower-claude-cache`), queue wait
//!   ([`QueueWait`](crate::rate_limit::QueueWait) plus [`pacing::PacingDelay`]);
//! * [`tower_claude_in_flight_requests`](names::IN_FLIGHT_REQUESTS);
//! * with a [`QuotaBoard`](crate::quota::QuotaBoard), quota gauges per key id and group, and
//!   alerts; with a [`forecast::Forecaster`], demand and forecast gauges.
//!
//! Labels are bounded: models outside [`names::KNOWN_MODELS`] (or
//! [`MetricsLayer::known_models`]) are `other`, keys appear only as
//! [`KeyId`](crate::anthropic::KeyId)s and only on quota gauges. Every name is in [`names`]
//! and in `docs/metrics.md`. The handles of the per-request series are registered once per
//! label set (at most 1,024 kept per metric) and reused, not looked up on every increment; they
//! belong to the recorder current when they were registered, and are registered again when
//! another recorder is current.
//!
//! Each request runs in a `claude_request` span with the fields `key`, `group`, `model`,
//! `stream`, `status`, `attempts`, `cache`, `served_model` and `queue_wait_ms`.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::body::RequestBody;
//! use tower_claude::metrics::{MetricsLayer, prometheus};
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let recorder = prometheus::builder().build_recorder();
//! let handle = recorder.handle();
//! let _guard = metrics::set_default_local_recorder(&recorder); // or prometheus::install()
//!
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":5}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let client = ServiceBuilder::new().layer(MetricsLayer::new()).service(upstream);
//! let request = http::Request::post("/v1/messages")
//!     .body(RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}"#))?;
//! let response = client.oneshot(request).await?;
//! response.into_body().collect().await?; // the request is counted when its body ends
//!
//! let text = prometheus::render(&handle);
//! assert!(text.contains(r#"tower_claude_output_tokens_total{model="claude-haiku-4-5",group="claude-haiku-4-5"} 5"#));
//! assert!(text.contains(r#"tower_claude_requests_total{model="claude-haiku-4-5",group="claude-haiku-4-5",status="200",outcome="success"} 1"#));
//! # Ok(())
//! # }
//! ```

pub mod alerts;
mod body;
pub mod forecast;
mod future;
mod handles;
mod layer;
pub mod names;
pub mod pacing;
pub mod prometheus;
mod retries;
mod service;
mod shared;

pub use body::MetricsBody;
pub use future::ResponseFuture;
pub use layer::MetricsLayer;
pub use service::Metrics;
