//! RateLimitLayer: admission, settlement from JSON and SSE bodies, refunds, cancellation,
//! learning limits from headers, and simulated workloads against MockClaude.
#![cfg(feature = "testing")]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{
    BucketSnapshot, KeyId, RateLimitGroup, RateLimitSnapshot, RequestMeta, Usage,
};
use tower_claude::body::RequestBody;
use tower_claude::concurrency::ConcurrencyLayer;
use tower_claude::quota::{AcquireError, AcquireErrorKind, Cost, Limits, QuotaBoard};
use tower_claude::rate_limit::{QueueWait, RateLimitLayer};
use tower_claude::testing::{MockClaude, MockLimits};

const API_KEY: &str = "sk-ant-test-key";

fn haiku() -> RateLimitGroup {
    RateLimitGroup::new("claude-haiku-4-5")
}

fn key() -> KeyId {
    KeyId::from_api_key(API_KEY)
}

fn body(model: &str, max_tokens: u64, stream: bool, words: usize) -> RequestBody {
    let text = "hello ".repeat(words);
    RequestBody::from(format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"{text}"}}]}}"#
    ))
}

fn messages(max_tokens: u64, stream: bool) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(body("claude-haiku-4-5", max_tokens, stream, 10))
        .unwrap()
}

fn input_estimate(req: &Request<RequestBody>) -> u64 {
    RequestMeta::scan(req.body().bytes()).unwrap().input_tokens
}

fn json_usage(input: u64, output: u64) -> Full<Bytes> {
    Full::new(Bytes::from(format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{{"input_tokens":{input},"output_tokens":{output},"cache_creation_input_tokens":0,"cache_read_input_tokens":5000}}}}"#
    )))
}

/// An upstream answering every request after `latency` with JSON usage (output `output`).
fn json_upstream(
    latency: Duration,
    output: u64,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
+ Send {
    tower::service_fn(move |req: Request<RequestBody>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let input = RequestMeta::scan(req.body().bytes())
            .map(|m| m.input_tokens)
            .unwrap_or(0);
        async move {
            tokio::time::sleep(latency).await;
            Ok::<_, BoxError>(Response::new(json_usage(input, output)))
        }
    })
}

fn output_remaining(board: &QuotaBoard) -> u64 {
    board
        .headroom(&key(), &haiku())
        .unwrap()
        .output_tokens
        .unwrap()
        .remaining
}

#[tokio::test(start_paused = true)]
async fn requests_wait_for_refill_and_report_the_wait() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(2, 100_000, 100_000));
    let svc = ServiceBuilder::new().layer(layer).service(json_upstream(
        Duration::ZERO,
        10,
        calls.clone(),
    ));
    let t0 = Instant::now();
    for _ in 0..2 {
        let r = svc.clone().oneshot(messages(100, false)).await.unwrap();
        assert_eq!(
            r.extensions().get::<QueueWait>(),
            Some(&QueueWait(Duration::ZERO))
        );
    }
    let r = svc.clone().oneshot(messages(100, false)).await.unwrap();
    // 2 requests per minute: the third waits 30 s for one request unit to refill.
    let wait = r.extensions().get::<QueueWait>().unwrap().0;
    assert_eq!(wait, t0.elapsed());
    assert!(
        wait >= Duration::from_secs(30) && wait <= Duration::from_millis(30_002),
        "{wait:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn settling_from_usage_wakes_waiters_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(1_000, 100_000, 4_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(json_upstream(
        Duration::from_secs(1),
        10,
        calls.clone(),
    ));
    // The first reserves max_tokens = 4 000: the whole output bucket; the second 3 990, what
    // the first gives back. (Not the ~67 tokens refilled while the first answer was on its
    // way: until its answer arrives, the server may not have taken it, and its bucket, full,
    // would not refill. Issue 12.)
    let first = tokio::spawn(svc.clone().oneshot(messages(4_000, false)));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(messages(3_990, false)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(board.statuses()[0].queue_depth, 1);

    let t0 = Instant::now();
    let first = first.await.unwrap().unwrap();
    let _ = first.into_body().collect().await.unwrap();
    // 10 tokens used: 3 990 refunded, and the waiter is admitted right away (refill alone would
    // take a minute).
    let second = second.await.unwrap().unwrap();
    let wait = second.extensions().get::<QueueWait>().unwrap().0;
    assert!(wait <= Duration::from_millis(1_001), "{wait:?}");
    // First answer at 1 s, second sent then and answered 1 s later.
    assert_eq!(t0.elapsed(), Duration::from_millis(1_500));
    let _ = second.into_body().collect().await.unwrap();
    // Both settled: 20 output tokens used (plus refill).
    assert!(output_remaining(&board) >= 3_980);
    assert_eq!(board.statuses()[0].in_flight, 0);
}

/// A streaming body fed by a channel.
struct ChanBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn sse(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

type Senders = Arc<Mutex<Vec<mpsc::UnboundedSender<Bytes>>>>;

fn sse_upstream(
    senders: Senders,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<ChanBody>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<ChanBody>, BoxError>> + Send,
> + Clone
+ Send {
    tower::service_fn(move |_req: Request<RequestBody>| {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.lock().unwrap().push(tx);
        async move {
            let mut resp = Response::new(ChanBody(rx));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, BoxError>(resp)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn streams_are_counted_until_the_end_of_the_body() {
    let senders = Senders::default();
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(1_000, 100_000, 8_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(sse_upstream(senders.clone()));
    let resp = svc.clone().oneshot(messages(5_000, true)).await.unwrap();
    let tx = senders.lock().unwrap().remove(0);
    let mut body = resp.into_body();
    tx.send(sse(
        "message_start",
        r#"{"type":"message_start","message":{"usage":{"input_tokens":30,"output_tokens":1}}}"#,
    ))
    .unwrap();
    let _ = body.frame().await.unwrap().unwrap();
    // The headers and the first event arrived, but the reservation is still held.
    assert_eq!(output_remaining(&board), 3_000);
    assert_eq!(board.statuses()[0].in_flight, 1);
    tx.send(sse(
        "message_delta",
        r#"{"type":"message_delta","usage":{"output_tokens":700}}"#,
    ))
    .unwrap();
    tx.send(sse("message_stop", r#"{"type":"message_stop"}"#))
        .unwrap();
    drop(tx);
    while body.frame().await.is_some() {}
    let h = board.headroom(&key(), &haiku()).unwrap();
    assert_eq!(h.output_tokens.unwrap().remaining, 7_300);
    assert_eq!(h.input_tokens.unwrap().remaining, 100_000 - 30);
    assert_eq!(board.statuses()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_early_settles_with_what_was_seen() {
    let senders = Senders::default();
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(1_000, 100_000, 8_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(sse_upstream(senders.clone()));
    let resp = svc.clone().oneshot(messages(5_000, true)).await.unwrap();
    let tx = senders.lock().unwrap().remove(0);
    tx.send(sse(
        "message_start",
        r#"{"type":"message_start","message":{"usage":{"input_tokens":30,"output_tokens":1}}}"#,
    ))
    .unwrap();
    let mut body = resp.into_body();
    let _ = body.frame().await.unwrap().unwrap();
    drop(body);
    let h = board.headroom(&key(), &haiku()).unwrap();
    assert_eq!(h.output_tokens.unwrap().remaining, 7_999);
    assert_eq!(h.input_tokens.unwrap().remaining, 100_000 - 30);
    assert_eq!(board.statuses()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_refund_everything_and_error_statuses_keep_the_request_unit() {
    let fail = Arc::new(AtomicUsize::new(0));
    let f = fail.clone();
    let upstream = tower::service_fn(move |_req: Request<RequestBody>| {
        let mode = f.load(Ordering::SeqCst);
        async move {
            match mode {
                0 => Err::<Response<Full<Bytes>>, BoxError>("connection refused".into()),
                _ => {
                    let mut r = Response::new(Full::new(Bytes::from_static(
                        br#"{"type":"error","error":{"type":"overloaded_error","message":"x"}}"#,
                    )));
                    *r.status_mut() = StatusCode::from_u16(529).unwrap();
                    Ok(r)
                }
            }
        }
    });
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(10, 100_000, 8_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let err = svc
        .clone()
        .oneshot(messages(5_000, false))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connection refused");
    let h = board.headroom(&key(), &haiku()).unwrap();
    assert_eq!(
        h.fraction, 1.0,
        "a request that never reached the server costs nothing"
    );

    fail.store(1, Ordering::SeqCst);
    let resp = svc.clone().oneshot(messages(5_000, false)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 529);
    let h = board.headroom(&key(), &haiku()).unwrap();
    assert_eq!(h.requests.unwrap().remaining, 9);
    assert_eq!(h.output_tokens.unwrap().remaining, 8_000);
    assert_eq!(h.input_tokens.unwrap().remaining, 100_000);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_and_request_too_large_are_typed_errors() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new()
        .limits(haiku(), Limits::new(1, 100, 8_000))
        .max_wait(Duration::from_secs(5));
    let svc = ServiceBuilder::new().layer(layer).service(json_upstream(
        Duration::ZERO,
        10,
        calls.clone(),
    ));
    let _ = svc.clone().oneshot(messages(10, false)).await.unwrap();
    let t0 = Instant::now();
    let err = svc.clone().oneshot(messages(10, false)).await.unwrap_err();
    let err = err.downcast_ref::<AcquireError>().unwrap();
    assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    let eta = err.available_in().unwrap();
    assert!(
        eta >= Duration::from_secs(54) && eta <= Duration::from_secs(55),
        "{eta:?}"
    );

    let mut big = messages(10, false);
    *big.body_mut() = body("claude-haiku-4-5", 10, false, 2_000);
    assert!(input_estimate(&big) > 100);
    let err = svc.clone().oneshot(big).await.unwrap_err();
    let err = err.downcast_ref::<AcquireError>().unwrap();
    assert_eq!(err.kind(), AcquireErrorKind::RequestTooLarge);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn other_requests_pass_through_untouched() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new()
        .limits(haiku(), Limits::new(1, 100, 100))
        .max_wait(Duration::ZERO);
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(json_upstream(
        Duration::ZERO,
        10,
        calls.clone(),
    ));
    for _ in 0..3 {
        let count = Request::post("/v1/messages/count_tokens")
            .body(body("claude-haiku-4-5", 10, false, 10))
            .unwrap();
        svc.clone().oneshot(count).await.unwrap();
        let broken = Request::post("/v1/messages")
            .body(RequestBody::from("{not json"))
            .unwrap();
        svc.clone().oneshot(broken).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert!(board.is_empty());
}

/// A JSON answer with Anthropic-like rate-limit headers: `rpm` requests a minute with
/// `requests_left` left, 10 000 input tokens (9 000 left), 2 000 output tokens (1 000 left).
fn answer_with_limits(rpm: u64, requests_left: u64) -> Response<Full<Bytes>> {
    let mut r = Response::new(json_usage(20, 10));
    let b = |limit: u64, remaining: u64| BucketSnapshot {
        limit: Some(limit),
        remaining: Some(remaining),
        reset: Some(SystemTime::now()),
    };
    RateLimitSnapshot {
        requests: b(rpm, requests_left),
        tokens: BucketSnapshot::default(),
        input_tokens: b(10_000, 9_000),
        output_tokens: b(2_000, 1_000),
    }
    .write_headers(r.headers_mut());
    r
}

/// A fake upstream with Anthropic-like headers: fixed limits, remaining as the test sets.
#[tokio::test(start_paused = true)]
async fn limits_are_learned_from_headers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_req: Request<RequestBody>| {
        let n = c.fetch_add(1, Ordering::SeqCst) as u64;
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(answer_with_limits(3, 2 - n.min(2)))
        }
    });
    let layer = RateLimitLayer::new();
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    // Unknown limits: one probe goes first, the others wait for its headers.
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(100, false))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The probe's headers said 3 rpm with 2 left: two more go at once, the fourth waits.
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let status = board.statuses().remove(0);
    assert!(!status.configured);
    assert_eq!(status.headroom.requests.unwrap().limit, 3);
    assert_eq!(status.headroom.output_tokens.unwrap().limit, 2_000);
    assert_eq!(status.queue_depth, 1);
    for t in tasks {
        let _ = t
            .await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// A probe whose caller gives up before the answer teaches nothing: the next request probes
/// again, and the limits its answer brings are enforced (the group is not left unlimited).
#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_does_not_lift_the_gate() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_req: Request<RequestBody>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            // The first call (the probe that will be cancelled) is slow.
            let secs = if n == 0 { 60 } else { 1 };
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok::<_, BoxError>(answer_with_limits(2, 1))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new())
        .service(upstream);
    let cancelled = tokio::time::timeout(
        Duration::from_secs(5),
        svc.clone().oneshot(messages(100, false)),
    )
    .await;
    assert!(cancelled.is_err());
    // Five requests: one probe, then the learned 2 rpm (1 left) lets one more through.
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(100, false))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "only the new probe went out"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the learned limit holds the rest"
    );
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn cancellation_at_any_point_leaks_nothing() {
    let senders = Senders::default();
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(20, 100_000, 6_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(sse_upstream(senders.clone()));
    let mut rng = 17u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let svc = svc.clone();
        let senders = senders.clone();
        let cancel_after = Duration::from_millis(next() % 20_000);
        let stage = next() % 4;
        tasks.push(tokio::spawn(async move {
            let work = async {
                let resp = svc.oneshot(messages(1_000 + i, true)).await?;
                let tx = senders.lock().unwrap().pop();
                if stage == 0 {
                    return Ok::<_, BoxError>(()); // body dropped before any event
                }
                if let Some(tx) = &tx {
                    let _ = tx.send(sse(
                        "message_start",
                        r#"{"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}"#,
                    ));
                    if stage == 2 {
                        let _ = tx.send(sse(
                            "message_delta",
                            r#"{"type":"message_delta","usage":{"output_tokens":300}}"#,
                        ));
                        let _ = tx.send(sse("message_stop", r#"{"type":"message_stop"}"#));
                    }
                }
                let mut body = resp.into_body();
                if stage == 3 {
                    tokio::time::sleep(Duration::from_secs(100)).await; // cancelled mid-stream
                }
                drop(tx);
                while body.frame().await.is_some() {}
                Ok(())
            };
            // Cancelled while queued, while streaming, or never.
            let _ = tokio::time::timeout(cancel_after, work).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    senders.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(120)).await;
    let status = board.statuses().remove(0);
    assert_eq!(status.queue_depth, 0);
    assert_eq!(status.in_flight, 0);
    assert_eq!(status.headroom.fraction, 1.0);
    // And the board still admits: nothing is stuck.
    assert!(board.fits_now(&key(), &haiku(), &Cost::new(1, 100_000, 6_000)));
}

#[tokio::test(start_paused = true)]
async fn stacks_with_the_concurrency_layer() {
    let senders = Senders::default();
    let board = QuotaBoard::builder()
        .limits(haiku(), Limits::new(100, 100_000, 100_000))
        .build();
    let conc = ConcurrencyLayer::new(2);
    let handle = conc.handle();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new().board(board.clone()))
        .layer(conc)
        .service(sse_upstream(senders.clone()));
    let a = svc.clone().oneshot(messages(10, true)).await.unwrap();
    let b = svc.clone().oneshot(messages(10, true)).await.unwrap();
    let c = tokio::spawn(svc.clone().oneshot(messages(10, true)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!c.is_finished());
    assert_eq!(handle.in_flight(), 2);
    assert_eq!(board.statuses()[0].in_flight, 3);
    drop(a);
    let c = c.await.unwrap().unwrap();
    drop((b, c));
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(board.statuses()[0].in_flight, 0);
}

// ---------------------------------------------------------------------------------------------
// Simulated workloads against MockClaude.

#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    ok: u64,
    upstream_429: u64,
    queue_timeouts: u64,
    /// (completion time, output tokens) of every answer, for utilisation.
    outputs: Vec<(Instant, u64)>,
}

/// 10 simulated minutes at 3x the output quota: half the requests stream. Returns what the
/// client saw and the upstream's view.
/// `nodes` independent limiters (each with its own board, like proxy nodes without a shared
/// backend) share the key; requests are spread round-robin over them.
async fn workload(
    configured: bool,
    nodes: usize,
) -> (Outcome, tower_claude::testing::MockStats, Duration) {
    let limits = MockLimits {
        rpm: 50,
        itpm: 30_000,
        otpm: 8_000,
    };
    let mock = MockClaude::builder()
        .limits("claude-haiku-4-5", limits)
        .seed(7)
        .latency(Duration::from_millis(400), Duration::from_millis(4))
        .output_tokens(200)
        .build();
    let services: Vec<_> = (0..nodes)
        .map(|_| {
            // Several nodes without a shared backend each declare their share.
            let board = QuotaBoard::builder()
                .local_share(1.0 / nodes as f64)
                .build();
            let mut layer = RateLimitLayer::new()
                .board(board)
                .max_wait(Duration::from_secs(60));
            if configured {
                layer = layer.limits(haiku(), Limits::new(50, 30_000, 8_000));
            }
            ServiceBuilder::new().layer(layer).service(mock.clone())
        })
        .collect();
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    // Binding limit: output, 8 000 / 200 = 40 answers a minute. Offer 120 a minute.
    let duration = Duration::from_secs(600);
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < duration {
        let svc = services[i as usize % nodes].clone();
        let outcome = outcome.clone();
        let stream = i % 2 == 0;
        i += 1;
        tasks.push(tokio::spawn(async move {
            let req = Request::post("https://api.anthropic.com/v1/messages")
                .header("x-api-key", API_KEY)
                .header("anthropic-version", "2023-06-01")
                .body(body("claude-haiku-4-5", 1_024, stream, 300))
                .unwrap();
            outcome.lock().unwrap().sent += 1;
            match svc.oneshot(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let bytes = resp.into_body().collect().await.map(|c| c.to_bytes());
                    let mut o = outcome.lock().unwrap();
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        o.upstream_429 += 1;
                    } else if status.is_success() {
                        o.ok += 1;
                        let out = match bytes {
                            Ok(b) if stream => {
                                let mut t = tower_claude::anthropic::StreamTracker::new();
                                t.feed(&b);
                                t.finish();
                                t.usage().output_tokens
                            }
                            Ok(b) => Usage::from_json(&b).map_or(0, |u| u.output_tokens),
                            Err(_) => 0,
                        };
                        o.outputs.push((Instant::now(), out));
                    }
                }
                Err(e) => {
                    if e.downcast_ref::<AcquireError>()
                        .is_some_and(|e| e.kind() == AcquireErrorKind::QueueTimeout)
                    {
                        outcome.lock().unwrap().queue_timeouts += 1;
                    }
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let outcome = Arc::try_unwrap(outcome).unwrap().into_inner().unwrap();
    (outcome, mock.stats(), start.elapsed())
}

/// Output tokens completed in `[from, to)` after `start`, as a fraction of OTPM x minutes.
fn utilisation(o: &Outcome, start: Instant, from: u64, to: u64) -> f64 {
    let used: u64 = o
        .outputs
        .iter()
        .filter(|(t, _)| {
            let s = t.duration_since(start).as_secs();
            s >= from && s < to
        })
        .map(|(_, n)| n)
        .sum();
    used as f64 / (8_000.0 * (to - from) as f64 / 60.0)
}

async fn run_workload(configured: bool) -> (Outcome, f64, f64, u64) {
    let start = Instant::now();
    let (o, stats, _) = workload(configured, 1).await;
    // Steady state: minutes 1 to 10 (the first minute also spends the initial full bucket).
    let steady = utilisation(&o, start, 60, 600);
    let whole = utilisation(&o, start, 0, 600);
    let mode = if configured { "configured" } else { "learned" };
    println!(
        "workload[{mode}]: sent {} ok {} upstream_429 {} ({:.2} %) queue_timeouts {} \
         upstream received {} accepted {} rate_limited {}; output utilisation minutes 1-10 \
         {:.1} %, whole run {:.1} %",
        o.sent,
        o.ok,
        o.upstream_429,
        100.0 * o.upstream_429 as f64 / stats.received.max(1) as f64,
        o.queue_timeouts,
        stats.received,
        stats.accepted,
        stats.rate_limited,
        steady * 100.0,
        whole * 100.0,
    );
    (o, steady, whole, stats.received)
}

#[tokio::test(start_paused = true)]
async fn workload_at_3x_quota_with_configured_limits_gets_no_429() {
    let (o, steady, _, received) = run_workload(true).await;
    assert_eq!(o.upstream_429, 0);
    assert!(received > 300);
    assert!(steady >= 0.95, "utilisation {steady}");
    assert!(
        o.queue_timeouts > 0,
        "3x the quota must overflow a 60 s queue"
    );
}

#[tokio::test(start_paused = true)]
async fn workload_at_3x_quota_with_learned_limits_stays_under_one_percent_429() {
    let (o, steady, _, received) = run_workload(false).await;
    assert!(
        (o.upstream_429 as f64) < 0.01 * received as f64,
        "{} 429s of {received}",
        o.upstream_429
    );
    assert!(steady >= 0.95, "utilisation {steady}");
}

#[tokio::test(start_paused = true)]
async fn workload_on_two_nodes_with_declared_local_shares_stays_under_one_percent_429() {
    let (o, stats, elapsed) = workload(false, 2).await;
    let sent = o.ok + o.upstream_429;
    let total_out = stats
        .output_tokens
        .get("claude-haiku-4-5")
        .copied()
        .unwrap_or(0);
    // Everything the upstream could deliver in the run: one full bucket plus the refill.
    let possible = 8_000.0 * (1.0 + elapsed.as_secs_f64() / 60.0);
    println!(
        "workload[2 nodes, learned, share 0.5 each]: sent upstream {sent}, 429 {} ({:.2} %), queue_timeouts {}; \
         output delivered {total_out} = {:.1} % of the possible {possible:.0}",
        o.upstream_429,
        100.0 * o.upstream_429 as f64 / sent.max(1) as f64,
        o.queue_timeouts,
        100.0 * total_out as f64 / possible,
    );
    assert!((o.upstream_429 as f64) < 0.01 * sent as f64);
    assert!(total_out as f64 >= 0.95 * possible);
}

#[tokio::test(start_paused = true)]
async fn a_429_refunds_first_then_takes_the_servers_view() {
    let upstream = tower::service_fn(|_req: Request<RequestBody>| async {
        let mut r = Response::new(Full::new(Bytes::from_static(
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        )));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let b = |limit: u64, remaining: u64| BucketSnapshot {
            limit: Some(limit),
            remaining: Some(remaining),
            reset: Some(SystemTime::now()),
        };
        // Someone else used the key: 2 000 output tokens left on the server.
        RateLimitSnapshot {
            requests: b(100, 90),
            tokens: BucketSnapshot::default(),
            input_tokens: b(100_000, 90_000),
            output_tokens: b(8_000, 2_000),
        }
        .write_headers(r.headers_mut());
        Ok::<_, BoxError>(r)
    });
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(100, 100_000, 8_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let resp = svc.oneshot(messages(5_000, false)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // The refused request's 5 000 reserved tokens were refunded, and the level then capped at
    // the server's view (not 2 000 + 5 000).
    assert_eq!(output_remaining(&board), 2_000);
}

/// Ready on the first `poll_ready` only (shared by clones), never woken after.
#[derive(Clone)]
struct ReadyOnce {
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Service<Request<RequestBody>> for ReadyOnce {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, _req: Request<RequestBody>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(json_usage(10, 10))))
    }
}

#[tokio::test(start_paused = true)]
async fn quota_granted_to_a_request_never_sent_is_refunded_when_it_is_dropped() {
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(100, 100_000, 1_000));
    let board = layer.quota_board().clone();
    let held = board
        .try_acquire(&key(), &haiku(), Cost::new(1, 0, 1_000))
        .unwrap();
    let inner = ReadyOnce {
        polls: Arc::default(),
        calls: Arc::default(),
    };
    let calls = inner.calls.clone();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    // Queued behind `held`; granted by its refund; then the inner service is not ready.
    let pending = tokio::spawn(tokio::time::timeout(
        Duration::from_secs(5),
        svc.oneshot(messages(500, false)),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    held.refund();
    let timed_out = pending.await.unwrap();
    assert!(
        timed_out.is_err(),
        "{:?}",
        timed_out.map(|r| r.map(|resp| resp.status()))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let status = board.statuses().remove(0);
    assert_eq!(status.in_flight, 0);
    assert_eq!(status.headroom.output_tokens.unwrap().remaining, 1_000);
    assert_eq!(status.headroom.requests.unwrap().remaining, 100);
}

/// Both layers in front of a hyper client talking to MockClaude over real loopback HTTP:
/// streams hold their concurrency permit and their reservation until the body ends.
#[tokio::test(start_paused = true)]
async fn stacked_layers_over_loopback_http() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let mock = MockClaude::builder()
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: 5,
                itpm: 100_000,
                otpm: 100_000,
            },
        )
        .latency(Duration::from_millis(200), Duration::from_millis(10))
        .output_tokens(50)
        .build();
    let (addr, server) = mock.serve_on_loopback().await.unwrap();
    let client: Client<_, RequestBody> = Client::builder(TokioExecutor::new()).build_http();
    let rate = RateLimitLayer::new().limits(haiku(), Limits::new(5, 100_000, 100_000));
    let board = rate.quota_board().clone();
    let conc = ConcurrencyLayer::new(2);
    let handle = conc.handle();
    let svc = ServiceBuilder::new()
        .layer(rate)
        .layer(conc)
        .service(client);

    let start = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let req = Request::post(format!("http://{addr}/v1/messages"))
                    .header("x-api-key", API_KEY)
                    .header("anthropic-version", "2023-06-01")
                    .header("content-type", "application/json")
                    .body(body("claude-haiku-4-5", 256, i % 2 == 0, 20))
                    .unwrap();
                let resp = svc.oneshot(req).await.unwrap();
                let status = resp.status();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                (status, bytes)
            })
        })
        .collect();
    for t in tasks {
        let (status, bytes) = t.await.unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 0);
    assert_eq!(stats.accepted, 8);
    assert!(stats.max_in_flight <= 2, "{}", stats.max_in_flight);
    // 5 per minute: the last 3 waited for refill (12 s each).
    assert!(
        start.elapsed() >= Duration::from_secs(36),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(handle.in_flight(), 0);
    let status = board.statuses().remove(0);
    assert_eq!(status.in_flight, 0);
    assert!(status.last_snapshot.is_some());
    server.abort();
}

/// A request's `retry::Deadline` bounds its wait for quota even without `max_wait`: the
/// limiter gives up at the deadline with a typed error instead of sleeping past it.
#[tokio::test(start_paused = true)]
async fn the_request_deadline_bounds_the_queue_wait() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(1, 100_000, 100_000));
    let svc = ServiceBuilder::new().layer(layer).service(json_upstream(
        Duration::ZERO,
        10,
        calls.clone(),
    ));
    svc.clone().oneshot(messages(100, false)).await.unwrap();
    let t0 = Instant::now();
    let mut req = messages(100, false);
    req.extensions_mut()
        .insert(tower_claude::retry::Deadline::after(Duration::from_secs(5)));
    let err = svc.clone().oneshot(req).await.unwrap_err();
    let err = err.downcast_ref::<AcquireError>().expect("AcquireError");
    assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the late request was never sent"
    );
}

/// An upstream that answers its first call with `first` rate-limit headers (raw values) and
/// every later call with no rate-limit header; counts calls.
fn upstream_with_first_headers(
    first: &'static [(&'static str, &'static str)],
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
+ Send {
    tower::service_fn(move |_req: Request<RequestBody>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = Response::new(json_usage(20, 10));
            if n == 0 {
                for (name, value) in first {
                    r.headers_mut()
                        .insert(*name, HeaderValue::from_static(value));
                }
            }
            Ok::<_, BoxError>(r)
        }
    })
}

/// Issue 18, bug 2: one answer saying `anthropic-ratelimit-*-limit: 0` locked the key and group
/// out for good (every later request refused as larger than the per-minute capacity, the
/// upstream never asked again). A limit of 0 is read as unknown.
#[tokio::test(start_paused = true)]
async fn a_zero_limit_header_does_not_lock_the_group_out() {
    const ZERO: &[(&str, &str)] = &[
        ("anthropic-ratelimit-requests-limit", "0"),
        ("anthropic-ratelimit-requests-remaining", "0"),
        ("anthropic-ratelimit-input-tokens-limit", "0"),
        ("anthropic-ratelimit-input-tokens-remaining", "0"),
        ("anthropic-ratelimit-output-tokens-limit", "0"),
        ("anthropic-ratelimit-output-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-limit", "0"),
    ];
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new().max_wait(Duration::from_secs(5));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream_with_first_headers(ZERO, calls.clone()));
    let start = Instant::now();
    for _ in 0..5 {
        let response = svc
            .clone()
            .oneshot(messages(100, false))
            .await
            .expect("not refused locally");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // Nothing was learned from the zeros.
    assert!(board.headroom(&key(), &haiku()).is_none());
}

/// Issue 18, bug 2: a learned limit smaller than a request (a broken or hostile answer) does
/// not refuse it locally for good: the request waits for the bucket to be full (at most a
/// minute) and asks the upstream again.
#[tokio::test(start_paused = true)]
async fn a_learned_limit_smaller_than_the_request_asks_upstream_again() {
    const TINY: &[(&str, &str)] = &[
        ("anthropic-ratelimit-input-tokens-limit", "1"),
        ("anthropic-ratelimit-input-tokens-remaining", "1"),
    ];
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream_with_first_headers(TINY, calls.clone()));
    let start = Instant::now();
    for _ in 0..2 {
        let response = svc
            .clone()
            .oneshot(messages(100, false))
            .await
            .expect("not refused locally");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        start.elapsed() <= Duration::from_secs(61),
        "{:?}",
        start.elapsed()
    );
}

/// Issue 18, bug 3: a usage block of `u64::MAX` tokens drained the bucket for ~584 years. The
/// parse clamps it and the bucket's debt is bounded by one capacity.
#[tokio::test(start_paused = true)]
async fn an_absurd_usage_block_drains_a_bucket_for_at_most_its_refill() {
    let upstream = tower::service_fn(|_req: Request<RequestBody>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
            br#"{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":18446744073709551615,"output_tokens":18446744073709551615,"cache_creation_input_tokens":18446744073709551615}}"#,
        ))))
    });
    let layer = RateLimitLayer::new().limits(haiku(), Limits::new(100, 100_000, 8_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let response = svc.clone().oneshot(messages(100, false)).await.unwrap();
    response.into_body().collect().await.unwrap();
    let headroom = board.headroom(&key(), &haiku()).unwrap();
    assert!(
        headroom.full_in <= Duration::from_secs(120),
        "{:?}",
        headroom.full_in
    );
    let cost = Cost::new(1, 1_000, 100);
    let wait = board.time_until_fits(&key(), &haiku(), &cost).unwrap();
    assert!(wait <= Duration::from_secs(120), "{wait:?}");
    // And the next request does go, within that wait.
    let start = Instant::now();
    let response = svc.oneshot(messages(100, false)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(start.elapsed() <= Duration::from_secs(121));
}

/// Issue 18, bug 4: every distinct model name (and every pass-through key) a client made up
/// created a permanent quota entry, even when upstream answered 404 (or 401). Entries that
/// nothing vouches for (no configured limit, no upstream success) are dropped once quiet.
#[tokio::test(start_paused = true)]
async fn made_up_model_names_and_keys_refused_upstream_leave_no_quota_entry() {
    let upstream = tower::service_fn(|req: Request<RequestBody>| async move {
        let known = req.headers().get("x-api-key").is_some_and(|k| k == API_KEY);
        let (status, body) = if !known {
            (
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            )
        } else {
            (
                404,
                r#"{"type":"error","error":{"type":"not_found_error","message":"model: not found"}}"#,
            )
        };
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok::<_, BoxError>(r)
    });
    // A configured group and learned ones: the configured entry stays.
    let layer =
        RateLimitLayer::new().limits(haiku(), Limits::new(1_000_000, 100_000_000, 100_000_000));
    let board = layer.quota_board().clone();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let send = |model: String, key: String| {
        let svc = svc.clone();
        async move {
            let req = Request::post("https://api.anthropic.com/v1/messages")
                .header("x-api-key", key)
                .body(body(&model, 10, false, 1))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        }
    };
    for i in 0..10_000 {
        let status = send(format!("claude-made-up-{i}"), API_KEY.to_owned()).await;
        assert_eq!(status, 404);
        let status = send("claude-haiku-4-5".to_owned(), format!("sk-ant-made-up-{i}")).await;
        assert_eq!(status, 401);
    }
    assert!(board.len() <= 1, "{} entries", board.len());
    assert!(board.statuses().len() <= 1);
}

/// Issue 18: a request no configured quota can ever admit (its input estimate is above the
/// per-minute capacity) was retried 8 times by a retry layer above (12 s) before the refusal;
/// it fails at once now, with the limiter's typed error as the source.
#[tokio::test(start_paused = true)]
async fn a_request_over_a_whole_minute_of_quota_fails_at_once_behind_a_retry_layer() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(tower_claude::retry::RetryLayer::new())
        .layer(RateLimitLayer::new().limits(haiku(), Limits::new(100, 50, 8_000)))
        .service(json_upstream(Duration::ZERO, 10, calls.clone()));
    let req = Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", API_KEY)
        .body(body("claude-haiku-4-5", 100, false, 2_000))
        .unwrap();
    let start = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let retry = err
        .downcast_ref::<tower_claude::retry::RetryError>()
        .expect("RetryError");
    assert_eq!(retry.attempts(), 1);
    let acquire = std::error::Error::source(retry)
        .and_then(|e| e.downcast_ref::<AcquireError>())
        .expect("AcquireError source");
    assert_eq!(acquire.kind(), AcquireErrorKind::RequestTooLarge);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
