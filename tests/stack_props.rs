//! Property test of the whole `ClaudeStack` against the simulator, in paused time: whatever the
//! mix of models, streams, identical prompts, server faults (529, 500, mid-stream errors),
//! callers that give up, and with or without a pool of two keys, every request ends exactly
//! once and never hangs; a 200 carries a
//! complete answer; upstream refuses nothing for quota when no caller gave up (the limiter
//! keeps within the limits, retries and fallbacks included); and the board is left with
//! nothing in flight or queued.
#![cfg(feature = "testing")]

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;
use tower_claude::anthropic::{StreamTracker, Usage};
use tower_claude::body::RequestBody;
use tower_claude::key_pool::KeyPoolLayer;
use tower_claude::quota::Limits;
use tower_claude::stack::{ClaudeStack, StackConfig};
use tower_claude::testing::{MockClaude, MockLimits};

const MODELS: [&str; 3] = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"];
const GROUPS: [&str; 3] = ["claude-opus-4", "claude-sonnet-4", "claude-haiku-4-5"];
const RPM: u64 = 6;
const ITPM: u64 = 40_000;
const OTPM: u64 = 8_000;

#[derive(Debug, Clone)]
struct Task {
    model: usize,
    stream: bool,
    max_tokens: u64,
    /// Few prompts and `max_tokens` values: identical requests meet in the cache, and in
    /// flight (coalesced, streams shared live).
    prompt: u8,
    start_ms: u64,
    /// The caller gives up after this long (`None`: it waits for the answer).
    give_up_ms: Option<u64>,
}

fn task() -> impl Strategy<Value = Task> {
    (
        0..MODELS.len(),
        any::<bool>(),
        prop_oneof![Just(64u64), Just(512), Just(1_500)],
        0u8..4,
        0u64..20_000,
        proptest::option::weighted(0.3, 0u64..20_000),
    )
        .prop_map(
            |(model, stream, max_tokens, prompt, start_ms, give_up_ms)| Task {
                model,
                stream,
                max_tokens,
                prompt,
                start_ms,
                give_up_ms,
            },
        )
}

#[derive(Debug)]
enum End {
    /// 200 with a complete answer (JSON with usage, or an SSE stream that reached
    /// `message_stop`, or one that failed mid-way with `event: error` after content).
    Answered,
    /// A non-200 answer (the stack's retries and fallbacks were exhausted).
    Refused(StatusCode),
    /// A typed error from a layer.
    Error(String),
    /// The caller gave up.
    GaveUp,
}

fn request(t: &Task) -> Request<RequestBody> {
    let body = format!(
        r#"{{"model":"{}","max_tokens":{},"stream":{},"temperature":0,"messages":[{{"role":"user","content":"prompt {}"}}]}}"#,
        MODELS[t.model], t.max_tokens, t.stream, t.prompt
    );
    Request::post("/v1/messages")
        .header("x-api-key", "sk-ant-props")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

/// The stack's two upstream keys when it holds a key pool.
const POOL: [&str; 2] = ["sk-ant-pool-one", "sk-ant-pool-two"];

fn run(
    seed: u64,
    rates: (f64, f64, f64),
    mut tasks: Vec<Task>,
    callers_give_up: bool,
    key_pool: bool,
) -> Result<(), TestCaseError> {
    if !callers_give_up {
        for t in &mut tasks {
            t.give_up_ms = None;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let limits = MockLimits {
            rpm: RPM,
            itpm: ITPM,
            otpm: OTPM,
        };
        let mut mock = MockClaude::builder()
            .seed(seed)
            .overloaded_rate(rates.0)
            .server_error_rate(rates.1)
            .midstream_error_rate(rates.2)
            .latency(Duration::from_millis(300), Duration::from_millis(2))
            .output_tokens(60);
        for group in GROUPS {
            mock = mock.limits(group, limits);
        }
        if key_pool {
            mock = mock.api_keys(POOL);
        }
        let mock = mock.build();
        let config = StackConfig {
            limits: GROUPS
                .iter()
                .map(|g| (g.to_string(), Limits::new(RPM, ITPM, OTPM)))
                .collect(),
            deadline: Some(Duration::from_secs(600)),
            seed: Some(seed),
            ..StackConfig::default()
        };
        let mut stack = ClaudeStack::from_config(&config).unwrap();
        if key_pool {
            stack = stack.key_pool(Some(KeyPoolLayer::new(POOL).unwrap()));
        }
        let svc = stack.service(mock.clone());
        let gave_up_any = tasks.iter().any(|t| t.give_up_ms.is_some());

        let handles: Vec<_> = tasks
            .iter()
            .cloned()
            .map(|t| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(t.start_ms)).await;
                    let work = async {
                        let resp = match svc.oneshot(request(&t)).await {
                            Ok(resp) => resp,
                            Err(e) => return End::Error(e.to_string()),
                        };
                        let status = resp.status();
                        let body = match resp.into_body().collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(e) => return End::Error(format!("body: {e}")),
                        };
                        if status != StatusCode::OK {
                            return End::Refused(status);
                        }
                        let complete = if body.starts_with(b"event:") {
                            let mut tracker = StreamTracker::new();
                            tracker.feed(&body);
                            tracker.finish();
                            tracker.is_complete() || tracker.error().is_some()
                        } else {
                            Usage::from_json(&body).is_some()
                        };
                        if complete {
                            End::Answered
                        } else {
                            End::Error(format!(
                                "incomplete 200 body: {}",
                                String::from_utf8_lossy(&body)
                            ))
                        }
                    };
                    match t.give_up_ms {
                        Some(ms) => tokio::time::timeout(Duration::from_millis(ms), work)
                            .await
                            .unwrap_or(End::GaveUp),
                        None => work.await,
                    }
                })
            })
            .collect();

        // Every task ends: none may outlive its deadline by much.
        let all = futures_util::future::join_all(handles);
        let ends = tokio::time::timeout(Duration::from_secs(900), all)
            .await
            .map_err(|_| TestCaseError::fail("a request never ended"))?;
        let mut answered = 0;
        for (t, end) in tasks.iter().zip(ends) {
            let end = end.map_err(|e| TestCaseError::fail(format!("task panicked: {e}")))?;
            match &end {
                End::Answered => answered += 1,
                End::GaveUp => prop_assert!(t.give_up_ms.is_some()),
                // With 8 attempts and fallback down the chain, a fault rate below 0.25 leaves
                // a server error at the end only by a long streak; anything else is a bug.
                End::Refused(s) => prop_assert!(
                    s.is_server_error() || s.as_u16() == 529,
                    "{t:?} refused with {s}"
                ),
                End::Error(e) => prop_assert!(false, "{t:?} ended with an error: {e}"),
            }
        }
        prop_assert!(answered > 0 || tasks.iter().all(|t| t.give_up_ms.is_some()));

        let stats = mock.stats();
        eprintln!(
            "{} tasks ({} give up): {answered} answered; upstream {} received, {} accepted, {} refused for quota, statuses {:?}",
            tasks.len(), tasks.iter().filter(|t| t.give_up_ms.is_some()).count(), stats.received, stats.accepted, stats.rate_limited, stats.by_status
        );
        if !gave_up_any {
            // Every reservation was settled from a complete answer: the limiter kept within
            // the server's limits, so the server refused nothing for quota.
            prop_assert_eq!(stats.rate_limited, 0, "{:?}", stats);
        }

        // Nothing stays in flight or queued (streams dropped by callers included).
        tokio::time::sleep(Duration::from_secs(120)).await;
        for s in stack.quota_board().statuses() {
            prop_assert_eq!(s.in_flight, 0, "{:?}", s);
            prop_assert_eq!(s.queue_depth, 0, "{:?}", s);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn every_request_ends_once_and_the_limits_hold(
        seed in any::<u64>(),
        overloaded in 0.0f64..0.2,
        server_errors in 0.0f64..0.05,
        midstream in 0.0f64..0.2,
        tasks in proptest::collection::vec(task(), 1..60),
        callers_give_up in any::<bool>(),
        key_pool in any::<bool>(),
    ) {
        run(seed, (overloaded, server_errors, midstream), tasks, callers_give_up, key_pool)?;
    }
}
