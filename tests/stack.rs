//! `ClaudeStack`: every layer in order, each one switchable.
#![cfg(feature = "testing")]

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_claude::body::RequestBody;
use tower_claude::retry::RetryInfo;
use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
use tower_claude::testing::{Fault, MockClaude};

fn request(model: &str) -> Request<RequestBody> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":32,"temperature":0,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-stack")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_default_stack_marks_what_each_layer_did() {
    let mock = MockClaude::builder().build();
    let stack = ClaudeStack::from_config(&StackConfig {
        seed: Some(3),
        ..StackConfig::default()
    })
    .unwrap();
    let svc = stack.service(mock.clone());

    // One 529 first: the retry layer absorbs it.
    mock.push_fault(Fault::Overloaded);
    let resp = svc
        .clone()
        .oneshot(request("claude-opus-4-7"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tower-claude-cache"], "miss");
    assert_eq!(resp.headers()["x-tower-claude-model"], "claude-opus-4-7");
    assert_eq!(resp.extensions().get::<RetryInfo>().unwrap().attempts(), 2);
    resp.into_body().collect().await.unwrap();

    // The same request again: a cache hit, nothing sent upstream.
    let before = mock.stats().received;
    let resp = svc
        .clone()
        .oneshot(request("claude-opus-4-7"))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-tower-claude-cache"], "hit");
    resp.into_body().collect().await.unwrap();
    assert_eq!(mock.stats().received, before);

    // The shared board learned the Opus group's limits from the headers.
    let statuses = stack.quota_board().statuses();
    assert!(statuses.iter().any(|s| s.group.as_str() == "claude-opus-4"));
}

#[tokio::test(start_paused = true)]
async fn every_layer_can_be_switched_off() {
    let mock = MockClaude::builder().build();
    let svc = ClaudeStack::from_config(&StackConfig {
        rate_limit: false,
        retry: false,
        fallback: false,
        cache: CacheConfig::Off,
        metrics: false,
        ..StackConfig::default()
    })
    .unwrap()
    .service(mock.clone());

    // Without retry, a scripted 429 reaches the caller unchanged, with its retry-after.
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(7),
    });
    let resp = svc
        .clone()
        .oneshot(request("claude-opus-4-7"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(resp.headers().get("x-tower-claude-cache").is_none());
    assert!(resp.headers().get("x-tower-claude-model").is_none());
    assert!(resp.extensions().get::<RetryInfo>().is_none());
}

/// One usage tracker per answer: the innermost layer that reads usage (the rate limiter)
/// publishes it, and retry, the cache and metrics read it instead of parsing the stream again,
/// so it is fed each byte exactly once.
#[tokio::test(start_paused = true)]
async fn a_stream_is_tracked_once_through_the_stack() {
    use tower_claude::anthropic::{BodyState, UsageTracker};
    let mock = MockClaude::builder().build();
    let stack = ClaudeStack::from_config(&StackConfig {
        seed: Some(3),
        ..StackConfig::default()
    })
    .unwrap();
    let svc = stack.service(mock.clone());
    let body = r#"{"model":"claude-sonnet-4-6","max_tokens":32,"temperature":0,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-stack")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap();
    let resp = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let tracker = resp.extensions().get::<UsageTracker>().unwrap().clone();
    let streamed = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(tracker.is_stream());
    assert_eq!(tracker.state(), BodyState::Complete);
    assert!(tracker.usage().unwrap().output_tokens > 0);
    assert_eq!(tracker.model().as_deref(), Some("claude-sonnet-4-6"));
    // Fed once: it saw exactly the bytes the caller got.
    let debug = format!("{tracker:?}");
    assert!(
        debug.contains(&format!("seen: {}", streamed.len())),
        "{debug} vs {} bytes",
        streamed.len()
    );
}

/// With the budget layer on (between the cache and fallback) and an adaptive concurrency cap
/// (which watches streams for a mid-stream error), the stream is still parsed once: both read
/// the one tracker, fed each byte once, instead of a parser of their own.
#[tokio::test(start_paused = true)]
async fn a_stream_is_tracked_once_with_the_budget_and_an_adaptive_cap_on() {
    use tower_claude::anthropic::{BodyState, UsageTracker};
    use tower_claude::tenant::budget::BudgetLayer;
    use tower_claude::tenant::spend::MemorySpend;
    use tower_claude::tenant::{Budget, PriceTable, Tenant};
    let mock = MockClaude::builder().output_tokens(40).build();
    // An adaptive concurrency cap too: the innermost layer that reads the stream, it
    // publishes the tracker the others read.
    let stack = ClaudeStack::from_config(&StackConfig {
        seed: Some(3),
        budget: Some(BudgetLayer::new(MemorySpend::new())),
        adaptive_concurrency: Some(tower_claude::concurrency::Aimd::default()),
        ..StackConfig::default()
    })
    .unwrap();
    let svc = stack.service(mock.clone());
    let team = Tenant::new("team").budget(Budget::default().per_month(10.0));
    let body = r#"{"model":"claude-sonnet-4-6","max_tokens":64,"temperature":0,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut req = Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-stack")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap();
    req.extensions_mut().insert(team.clone());
    let resp = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let tracker = resp.extensions().get::<UsageTracker>().unwrap().clone();
    let streamed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(tracker.state(), BodyState::Complete);
    let debug = format!("{tracker:?}");
    assert!(
        debug.contains(&format!("seen: {}", streamed.len())),
        "{debug} vs {} bytes",
        streamed.len()
    );
    // The budget charged what that one tracker read.
    let usage = tracker.usage().unwrap();
    assert_eq!(usage.output_tokens, 40);
    let cost = PriceTable::default().cost_micro_usd("claude-sonnet-4-6", &usage);
    assert!(cost > 0);
    assert_eq!((team.stats().cost_usd() * 1e6).round() as u64, cost);
}

/// Retry sends the request it got from fallback as its first attempt and rebuilds the second
/// from fallback's copy (no copy of its own): both attempts must be the same request, with
/// everything fallback and retry put on it, whichever model fallback chose.
/// A request sent once clones no service: retry and fallback send the first attempt with the
/// service `poll_ready` readied and keep one spare clone each, from which only a later
/// attempt (a retry, another model) clones its own.
#[tokio::test(start_paused = true)]
async fn a_request_sent_once_clones_no_service() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use tower::Service;
    use tower_claude::testing::MockBody;

    /// The mock, counting its clones.
    struct Counted {
        mock: MockClaude,
        clones: Arc<AtomicUsize>,
    }
    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::Relaxed);
            Self {
                mock: self.mock.clone(),
                clones: self.clones.clone(),
            }
        }
    }
    impl Service<Request<RequestBody>> for Counted {
        type Response = http::Response<MockBody>;
        type Error = tower_claude::BoxError;
        type Future = <MockClaude as Service<Request<RequestBody>>>::Future;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Service::<Request<RequestBody>>::poll_ready(&mut self.mock, cx)
        }
        fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
            self.mock.call(req)
        }
    }

    let mock = MockClaude::builder().build();
    let clones = Arc::new(AtomicUsize::new(0));
    let stack = ClaudeStack::from_config(&StackConfig {
        cache: CacheConfig::Off,
        seed: Some(1),
        ..StackConfig::default()
    })
    .unwrap();
    let mut svc = stack.service(Counted {
        mock: mock.clone(),
        clones: clones.clone(),
    });
    let send = |svc: &mut tower_claude::stack::ClaudeService| {
        let fut = svc.call(request("claude-sonnet-4-6"));
        async move {
            let resp = fut.await.unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status
        }
    };
    // The first request takes the spares.
    svc.ready().await.unwrap();
    assert_eq!(send(&mut svc).await, 200);
    let after_first = clones.load(Ordering::Relaxed);
    for _ in 0..5 {
        svc.ready().await.unwrap();
        assert_eq!(send(&mut svc).await, 200);
    }
    assert_eq!(
        clones.load(Ordering::Relaxed),
        after_first,
        "five more requests, each sent once: no clone"
    );
    // A 529 is retried: that attempt's service is a clone (of retry's spare).
    mock.push_fault(Fault::Overloaded);
    svc.ready().await.unwrap();
    assert_eq!(send(&mut svc).await, 200);
    assert_eq!(clones.load(Ordering::Relaxed), after_first + 1);
    assert_eq!(mock.stats().received, 8);
}

/// A long 429 while a lower model is left: retry, directly below fallback in the stack, takes
/// fallback's `MaxServerWait` from the description fallback attached (it is not on the
/// request) and does not sit the wait out; the request moves down at once.
#[tokio::test(start_paused = true)]
async fn a_long_429_moves_down_at_once_through_the_stack() {
    use tower_claude::exchange::ServedModel;
    use tower_claude::quota::Limits;

    let mock = MockClaude::builder().build();
    let roomy = Limits::new(1000, 1_000_000, 1_000_000);
    let stack = ClaudeStack::from_config(&StackConfig {
        cache: CacheConfig::Off,
        seed: Some(1),
        limits: [
            ("claude-sonnet-4".to_owned(), roomy),
            ("claude-haiku-4-5".to_owned(), roomy),
        ]
        .into_iter()
        .collect(),
        ..StackConfig::default()
    })
    .unwrap();
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(45),
    });
    let start = tokio::time::Instant::now();
    let resp = stack
        .service(mock.clone())
        .oneshot(request("claude-sonnet-4-6"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let served = resp.extensions().get::<ServedModel>().unwrap();
    assert_eq!(
        (&*served.requested, &*served.served, served.failovers),
        ("claude-sonnet-4-6", "claude-haiku-4-5", 1)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(mock.stats().received, 2);
}

#[tokio::test(start_paused = true)]
async fn a_retried_attempt_is_the_request_fallback_sent() {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::Response;
    use http_body_util::Full;
    use tower_claude::BoxError;
    use tower_claude::anthropic::RequestMeta;
    use tower_claude::quota::Limits;
    use tower_claude::retry::{Deadline, MaxServerWait};

    type Seen = (
        Option<String>,
        Vec<(String, String)>,
        Bytes,
        Option<RequestMeta>,
        Option<MaxServerWait>,
        Option<Deadline>,
    );
    for (model, limits) in [
        // The board knows nothing: the requested model is sent.
        ("claude-sonnet-4-6", vec![]),
        // Sonnet has no headroom: fallback rewrites the body to Haiku (a meta of its own).
        (
            "claude-sonnet-4-6",
            vec![
                ("claude-sonnet-4".to_owned(), Limits::new(1, 1, 1)),
                (
                    "claude-haiku-4-5".to_owned(),
                    Limits::new(1000, 1_000_000, 1_000_000),
                ),
            ],
        ),
    ] {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let inner = tower::service_fn(move |req: Request<RequestBody>| {
            let record = record.clone();
            async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                    .filter(|(n, _)| n != "x-tower-claude-attempt")
                    .collect();
                let mut seen = record.lock().unwrap();
                seen.push((
                    req.headers()
                        .get("x-tower-claude-attempt")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    headers,
                    req.body().bytes().clone(),
                    req.extensions().get::<RequestMeta>().cloned(),
                    req.extensions().get::<MaxServerWait>().copied(),
                    req.extensions().get::<Deadline>().copied(),
                ));
                let first = seen.len() == 1;
                drop(seen);
                let res = if first {
                    Response::builder()
                        .status(529)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                        )))
                } else {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":3,"output_tokens":1}}"#,
                        )))
                };
                Ok::<_, BoxError>(res.unwrap())
            }
        });
        let has_limits = !limits.is_empty();
        let stack = ClaudeStack::from_config(&StackConfig {
            cache: CacheConfig::Off,
            seed: Some(1),
            deadline: Some(Duration::from_secs(600)),
            limits: limits.into_iter().collect(),
            ..StackConfig::default()
        })
        .unwrap();
        if has_limits {
            // Use up Sonnet's one request of the minute.
            let key = tower_claude::anthropic::KeyId::from_api_key("sk-ant-stack");
            let group = tower_claude::anthropic::RateLimitGroup::new("claude-sonnet-4");
            let r = stack
                .quota_board()
                .try_acquire(&key, &group, tower_claude::quota::Cost::new(1, 1, 1))
                .unwrap();
            r.keep();
        }
        let resp = stack.service(inner).oneshot(request(model)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.extensions().get::<RetryInfo>().unwrap().attempts(), 2);
        let served = resp.headers()["x-tower-claude-model"]
            .to_str()
            .unwrap()
            .to_owned();
        resp.into_body().collect().await.unwrap();

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let (first, second) = (&seen[0], &seen[1]);
        assert_eq!(first.0.as_deref(), Some("1"));
        assert_eq!(second.0.as_deref(), Some("2"));
        assert_eq!(first.1, second.1, "headers");
        assert!(
            first
                .1
                .iter()
                .any(|(n, v)| n == "x-api-key" && v == "sk-ant-stack")
        );
        assert_eq!(first.2, second.2, "body");
        assert!(std::str::from_utf8(&first.2).unwrap().contains(&served));
        let meta = first.3.as_ref().unwrap();
        assert_eq!(meta.model.as_deref(), Some(served.as_str()));
        assert_eq!(first.3, second.3, "RequestMeta");
        assert_eq!(first.4, second.4, "MaxServerWait");
        assert!(first.5.is_some(), "the retry layer's deadline");
        assert_eq!(first.5, second.5, "Deadline");
        if has_limits {
            assert_eq!(served, "claude-haiku-4-5");
        } else {
            assert_eq!(served, model);
        }
    }
}

/// Below the metrics layer the key id is read from the memo it left, not from the headers
/// again: the key pool remembers the key it puts on, so the rate limiter takes the pool's
/// admission on that key (a stale memo would book the caller's key as well), and the fallback
/// layer above the pool reads the caller's.
#[tokio::test(start_paused = true)]
async fn the_key_a_pool_puts_on_is_the_one_the_layers_below_read() {
    use tower_claude::anthropic::KeyId;
    use tower_claude::key_pool::KeyPoolLayer;

    const POOL: [&str; 2] = ["sk-ant-pool-one", "sk-ant-pool-two"];
    let mock = MockClaude::builder().api_keys(POOL).build();
    let stack = ClaudeStack::from_config(&StackConfig {
        cache: CacheConfig::Off,
        seed: Some(5),
        ..StackConfig::default()
    })
    .unwrap()
    .key_pool(Some(KeyPoolLayer::new(POOL).unwrap()));
    assert!(stack.metrics_layer().is_some() || !cfg!(feature = "metrics"));
    let svc = stack.service(mock.clone());
    for _ in 0..4 {
        let resp = svc
            .clone()
            .oneshot(request("claude-haiku-4-5"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let pool: Vec<KeyId> = POOL.iter().map(|k| KeyId::from_api_key(k)).collect();
    let statuses = stack.quota_board().statuses();
    assert!(!statuses.is_empty());
    for status in &statuses {
        assert!(
            pool.contains(&status.key),
            "the board holds {:?}, not a key of the pool",
            status.key
        );
        assert_eq!(status.in_flight, 0, "every reservation settled");
    }
}
