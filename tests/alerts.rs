//! Quota alerts delivered to a local webhook receiver (a hyper server on 127.0.0.1).
#![cfg(all(feature = "testing", feature = "metrics"))]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceBuilder;
use tower::ServiceExt;
use tower_claude::anthropic::{KeyId, RateLimitGroup};
use tower_claude::body::RequestBody;
use tower_claude::metrics::alerts::{AlertState, Alerts, Webhook};
use tower_claude::metrics::{MetricsLayer, prometheus};
use tower_claude::quota::{Limits, QuotaBoard};
use tower_claude::rate_limit::RateLimitLayer;
use tower_claude::testing::{MockClaude, MockLimits};

/// What the receiver does with each request.
#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    FailTimes(u32),
    Hang,
}

#[derive(Clone, Default)]
struct Received {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    hits: Arc<AtomicU32>,
    notify: Arc<Notify>,
}

async fn receiver(behaviour: Behaviour) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/quota", listener.local_addr().unwrap());
    let received = Received::default();
    let state = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move {
                        let hit = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
                        state.notify.notify_one();
                        assert_eq!(req.method(), http::Method::POST);
                        assert_eq!(req.uri().path(), "/hooks/quota");
                        assert_eq!(req.headers()["content-type"], "application/json");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = match behaviour {
                            Behaviour::Ok => StatusCode::OK,
                            Behaviour::FailTimes(n) if hit <= n => {
                                StatusCode::INTERNAL_SERVER_ERROR
                            }
                            Behaviour::FailTimes(_) => StatusCode::OK,
                            Behaviour::Hang => {
                                std::future::pending::<()>().await;
                                StatusCode::OK
                            }
                        };
                        if status == StatusCode::OK {
                            state
                                .bodies
                                .lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            state.notify.notify_one();
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received)
}

async fn wait_for(received: &Received, hits: u32) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while received.hits.load(Ordering::SeqCst) < hits {
            received.notify.notified().await;
        }
    })
    .await
    .expect("webhook hits");
}

fn request() -> Request<RequestBody> {
    Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-alerts")
        .body(RequestBody::from(
            r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap()
}

#[tokio::test]
async fn utilisation_alert_reaches_the_webhook_once_per_interval() {
    let (url, received) = receiver(Behaviour::Ok).await;
    let callback_alerts = Arc::new(Mutex::new(Vec::new()));
    let sink = callback_alerts.clone();
    let alerts = Alerts::builder()
        .threshold(0.8)
        .interval(Duration::from_secs(3600))
        .on_alert(move |a| {
            sink.lock()
                .unwrap()
                .push((a.state(), a.bucket().to_owned()))
        })
        .webhook(Webhook::new(&url).unwrap())
        .build();
    let group = RateLimitGroup::new("claude-haiku-4-5");
    let limits = Limits::new(10, 1_000_000, 100_000);
    let board = QuotaBoard::new();
    let svc = ServiceBuilder::new()
        .layer(
            MetricsLayer::new()
                .board(board.clone())
                .alerts(alerts)
                .quota_refresh(Duration::ZERO),
        )
        .layer(
            RateLimitLayer::new()
                .board(board)
                .limits(group.clone(), limits),
        )
        .service(
            MockClaude::builder()
                .limits(group.as_str(), MockLimits::new(10, 1_000_000, 100_000))
                .build(),
        );
    // 9 of 10 requests per minute: utilisation reaches 80 % at the 8th, and stays above.
    for _ in 0..9 {
        let response = svc.clone().oneshot(request()).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    wait_for(&received, 1).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while received.bodies.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let bodies = received.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let text = bodies[0]["text"].as_str().unwrap();
    let key = KeyId::from_api_key("sk-ant-alerts");
    assert!(
        text.contains(key.as_str()) && text.contains("claude-haiku-4-5"),
        "{text}"
    );
    assert!(text.contains("requests per-minute limit"), "{text}");
    assert!(!text.contains("sk-ant-alerts"));
    assert_eq!(
        *callback_alerts.lock().unwrap(),
        [(AlertState::Firing, "requests".to_owned())]
    );
}

#[tokio::test]
async fn failing_webhook_is_retried_a_bounded_number_of_times() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Fails twice, then accepts: 3 attempts deliver.
    let (url, received) = receiver(Behaviour::FailTimes(2)).await;
    let webhook = Webhook::new(&url)
        .unwrap()
        .attempts(3)
        .backoff(Duration::from_millis(5));
    let alerts = Alerts::builder().webhook(webhook).build();
    let group = RateLimitGroup::new("g");
    alerts
        .observe(&KeyId::named("k-1"), &group, "requests", 0.9)
        .unwrap();
    wait_for(&received, 3).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while received.bodies.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(received.hits.load(Ordering::SeqCst), 3);

    // Always failing: exactly `attempts` tries, then given up.
    let (url, received) = receiver(Behaviour::FailTimes(u32::MAX)).await;
    let webhook = Webhook::new(&url)
        .unwrap()
        .attempts(2)
        .backoff(Duration::from_millis(5));
    let alerts = Alerts::builder().webhook(webhook).build();
    alerts
        .observe(&KeyId::named("k-2"), &group, "requests", 0.9)
        .unwrap();
    wait_for(&received, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(received.hits.load(Ordering::SeqCst), 2);
    let text = prometheus::render(&handle);
    assert!(
        text.contains(r#"tower_claude_alert_deliveries_total{result="delivered"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"tower_claude_alert_deliveries_total{result="failed"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_hanging_webhook_never_slows_the_caller() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let (url, received) = receiver(Behaviour::Hang).await;
    let webhook = Webhook::new(&url)
        .unwrap()
        .queue(4)
        .timeout(Duration::from_secs(30));
    let alerts = Alerts::builder().webhook(webhook).build();
    let group = RateLimitGroup::new("g");
    let started = Instant::now();
    for i in 0..1_000 {
        let key = KeyId::named(&format!("k-{i}"));
        assert!(
            alerts
                .observe(&key, &group, "output_tokens", 0.95)
                .is_some()
        );
    }
    // 1 000 alerts raised without waiting for the webhook (generous bound for slow CI).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    wait_for(&received, 1).await;
    let text = prometheus::render(&handle);
    // One in delivery, at most 4 queued: the rest were dropped, not waited for.
    let dropped = text
        .lines()
        .find(|l| l.starts_with(r#"tower_claude_alert_deliveries_total{result="dropped"}"#))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .unwrap();
    assert!(dropped >= 995.0, "{dropped}");
}
