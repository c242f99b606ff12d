//! Service-level tests of `RetryLayer` (paused time): classification, server delays, pacing,
//! the deadline, the budget, streams, and a 1,000-task batch against `MockClaude` (feature
//! `testing`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::ApiError;
use tower_claude::body::RequestBody;
use tower_claude::retry::{
    Deadline, Jitter, MaxServerWait, RetryBudget, RetryError, RetryErrorKind, RetryInfo,
    RetryLayer, RetryOutcome,
};

type Body = BoxBody<Bytes, BoxError>;

/// One scripted upstream outcome.
#[derive(Clone, Debug)]
enum Step {
    /// A response: status, headers, body.
    Reply(u16, Vec<(&'static str, String)>, &'static str),
    /// An SSE 200 whose body is these chunks, optionally ending with a body error.
    Stream(Vec<&'static str>, bool),
    /// The inner service fails (connection refused).
    Fail,
}

fn ok() -> Step {
    Step::Reply(200, vec![], r#"{"type":"message","content":[]}"#)
}

fn status(code: u16) -> Step {
    let body = match code {
        429 => r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        529 => r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        500 => r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
        _ => r#"{"type":"error","error":{"type":"invalid_request_error","message":"nope"}}"#,
    };
    Step::Reply(code, vec![], body)
}

/// What the fake saw of one attempt.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    task: Option<String>,
    attempt: Option<String>,
    deadline: Option<Deadline>,
}

/// A scripted upstream: answers each call with the next step (then 200s), after `latency`.
#[derive(Clone)]
struct Fake {
    script: Arc<Mutex<VecDeque<Step>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    ready_calls: Arc<Mutex<u32>>,
    latency: Duration,
}

impl Fake {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            script: Arc::new(Mutex::new(steps.into_iter().collect())),
            seen: Arc::default(),
            ready_calls: Arc::default(),
            latency: Duration::ZERO,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

const SSE_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-6\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n";
const SSE_PING: &str = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
const SSE_BLOCK: &str = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
const SSE_DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const SSE_ERROR: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
const SSE_END: &str = "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

impl Service<Request<RequestBody>> for Fake {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        *self.ready_calls.lock().unwrap() += 1;
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        self.seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            task: req
                .headers()
                .get("x-task")
                .map(|v| v.to_str().unwrap().to_string()),
            attempt: req
                .headers()
                .get("x-tower-claude-attempt")
                .map(|v| v.to_str().unwrap().to_string()),
            deadline: req.extensions().get::<Deadline>().copied(),
        });
        let step = self.script.lock().unwrap().pop_front().unwrap_or_else(ok);
        let latency = self.latency;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            match step {
                Step::Fail => Err("connection refused".into()),
                Step::Reply(code, headers, body) => {
                    let mut resp = Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .header("request-id", "req_test");
                    for (k, v) in headers {
                        resp = resp.header(k, v);
                    }
                    Ok(resp.body(
                        Full::new(Bytes::from_static(body.as_bytes()))
                            .map_err(|e| match e {})
                            .boxed(),
                    )?)
                }
                Step::Stream(chunks, fail) => {
                    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
                        .into_iter()
                        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                        .collect();
                    if fail {
                        frames.push(Err("connection reset".into()));
                    }
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    Ok(Response::builder()
                        .status(200)
                        .header("content-type", "text/event-stream")
                        .body(BodyExt::boxed(body))?)
                }
            }
        })
    }
}

const BODY: &str =
    r#"{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_BODY: &str = r#"{"model":"claude-sonnet-4-6","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn messages(body: &'static str) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::new().seed(7)
}

async fn send(
    layer: RetryLayer,
    fake: &Fake,
    req: Request<RequestBody>,
) -> Result<(Response<Bytes>, Option<RetryInfo>), BoxError> {
    let resp = layer.layer(fake.clone()).oneshot(req).await?;
    let (parts, body) = resp.into_parts();
    let info = parts.extensions.get::<RetryInfo>().cloned();
    let bytes = body.collect().await?.to_bytes();
    Ok((Response::from_parts(parts, bytes), info))
}

#[tokio::test(start_paused = true)]
async fn transient_statuses_are_retried_until_success() {
    for code in [408, 409, 429, 500, 502, 503, 504, 529] {
        let fake = Fake::new([status(code), status(code)]);
        let (resp, info) = send(layer(), &fake, messages(BODY)).await.unwrap();
        assert_eq!(resp.status(), 200, "{code}");
        assert_eq!(fake.attempts(), 3, "{code}");
        let info = info.unwrap();
        assert_eq!(info.attempts(), 3);
        assert_eq!(info.outcome(), RetryOutcome::Success);
        assert_eq!(
            info.last_failure_status(),
            Some(StatusCode::from_u16(code).unwrap())
        );
        assert!(info.total_wait() > Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn client_errors_are_returned_at_once() {
    for code in [400, 401, 403, 404, 413] {
        let fake = Fake::new([status(code)]);
        let (resp, info) = send(layer(), &fake, messages(BODY)).await.unwrap();
        assert_eq!(resp.status(), code);
        assert_eq!(fake.attempts(), 1, "{code}");
        let info = info.unwrap();
        assert_eq!(info.outcome(), RetryOutcome::NotRetryable);
        assert_eq!(info.total_wait(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_overrides_the_status() {
    let fake = Fake::new([Step::Reply(
        400,
        vec![("x-should-retry", "true".into())],
        r#"{"type":"error","error":{"type":"invalid_request_error","message":"transient"}}"#,
    )]);
    let (resp, _) = send(layer(), &fake, messages(BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.attempts(), 2);

    let fake = Fake::new([Step::Reply(
        529,
        vec![("x-should-retry", "false".into())],
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    )]);
    let (resp, info) = send(layer(), &fake, messages(BODY)).await.unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(fake.attempts(), 1);
    assert_eq!(info.unwrap().outcome(), RetryOutcome::NotRetryable);
}

#[tokio::test(start_paused = true)]
async fn spend_cap_fails_at_once_with_a_typed_error() {
    let fake = Fake::new([Step::Reply(
        429,
        vec![("x-should-retry", "true".into())],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits.","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
    )]);
    let err = send(layer(), &fake, messages(BODY)).await.unwrap_err();
    let err = err.downcast_ref::<RetryError>().expect("a RetryError");
    assert_eq!(err.kind(), RetryErrorKind::SpendLimit);
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.last_status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(err.request_id(), Some("req_test"));
    assert!(err.message().unwrap().contains("usage limits"));
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_are_retried_then_reported_with_source() {
    let fake = Fake::new([Step::Fail, ok()]);
    let (resp, info) = send(layer(), &fake, messages(BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        info.unwrap().last_error_message(),
        Some("connection refused")
    );

    let fake = Fake::new(std::iter::once(status(529)).chain(std::iter::repeat_n(Step::Fail, 10)));
    let err = send(layer().max_attempts(3), &fake, messages(BODY))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<RetryError>().unwrap();
    assert_eq!(err.kind(), RetryErrorKind::Exhausted);
    assert_eq!(err.attempts(), 3);
    assert!(err.elapsed() >= err.total_wait() && err.total_wait() > Duration::ZERO);
    assert_eq!(
        std::error::Error::source(err).unwrap().to_string(),
        "connection refused"
    );
    // The last HTTP answer seen is reported too.
    assert_eq!(err.last_status().map(|s| s.as_u16()), Some(529));
    assert_eq!(err.message(), Some("Overloaded"));
    assert_eq!(fake.attempts(), 3);

    // A predicate can refuse to retry some errors.
    let fake = Fake::new([Step::Fail]);
    let err = send(layer().retry_errors_if(|_| false), &fake, messages(BODY))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<RetryError>().unwrap().kind(),
        RetryErrorKind::Inner
    );
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_last_upstream_response_unchanged() {
    let fake = Fake::new((0..3).map(|i| {
        Step::Reply(
            529,
            vec![("retry-after", "1".into()), ("x-attempt", i.to_string())],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )
    }));
    let (resp, info) = send(layer().max_attempts(3), &fake, messages(BODY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["x-attempt"], "2");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["request-id"], "req_test");
    assert_eq!(
        &resp.body()[..],
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
    );
    let info = info.unwrap();
    assert_eq!(info.outcome(), RetryOutcome::Exhausted);
    assert_eq!(info.attempts(), 3);
    assert_eq!(info.last_error_message(), Some("Overloaded"));
    assert!(info.total_wait() >= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn attempts_are_numbered_and_the_service_is_readied_each_time() {
    let fake = Fake::new([status(529), Step::Fail, status(500)]);
    let mut svc = layer().layer(fake.clone());
    let resp = svc
        .ready()
        .await
        .unwrap()
        .call(messages(BODY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let attempts: Vec<_> = fake
        .seen()
        .into_iter()
        .map(|s| s.attempt.unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    // Once by the caller, then once before each of the three retries.
    assert_eq!(*fake.ready_calls.lock().unwrap(), 4);
}

#[tokio::test(start_paused = true)]
async fn other_endpoints_pass_through_untouched() {
    let fake = Fake::new([status(529)]);
    let req = Request::get("https://api.anthropic.com/v1/models")
        .body(RequestBody::empty())
        .unwrap();
    let (resp, info) = send(layer(), &fake, req).await.unwrap();
    assert_eq!(resp.status(), 529);
    assert!(info.is_none());
    assert_eq!(fake.attempts(), 1);
    assert!(fake.seen()[0].attempt.is_none());

    // An unreadable body is passed through as well: upstream answers 400.
    let fake = Fake::new([status(529)]);
    let (resp, _) = send(layer(), &fake, messages("not json")).await.unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(fake.attempts(), 1);
}

/// The gap between the first two attempts for a 429 carrying `headers`.
async fn first_wait(headers: Vec<(&'static str, String)>) -> Duration {
    let fake = Fake::new([Step::Reply(
        429,
        headers,
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )]);
    send(layer(), &fake, messages(BODY)).await.unwrap();
    let seen = fake.seen();
    seen[1].at - seen[0].at
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_all_three_forms_is_a_floor() {
    let ms = first_wait(vec![
        ("retry-after-ms", "2500".into()),
        ("retry-after", "9".into()),
    ])
    .await;
    assert!(
        ms >= Duration::from_millis(2500) && ms <= Duration::from_millis(3500),
        "{ms:?}"
    );

    let secs = first_wait(vec![("retry-after", "4".into())]).await;
    assert!(
        secs >= Duration::from_secs(4) && secs <= Duration::from_secs(5),
        "{secs:?}"
    );

    // An HTTP date, measured against the wall clock (whole-second precision).
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(6));
    let dated = first_wait(vec![("retry-after", date)]).await;
    assert!(
        dated >= Duration::from_secs(5) && dated <= Duration::from_secs(7),
        "{dated:?}"
    );

    // No retry-after: the reset of the exhausted bucket.
    let reset = time::OffsetDateTime::from(SystemTime::now() + Duration::from_secs(12))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let until_reset = first_wait(vec![
        ("anthropic-ratelimit-requests-remaining", "0".into()),
        ("anthropic-ratelimit-requests-reset", reset),
    ])
    .await;
    assert!(
        until_reset >= Duration::from_secs(11) && until_reset <= Duration::from_secs(13),
        "{until_reset:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn callers_told_the_same_retry_after_come_back_spread_out() {
    let fake = Fake::new((0..100).map(|_| {
        Step::Reply(
            429,
            vec![("retry-after", "1".into())],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        )
    }));
    // Without pacing, to see the spread alone (as between processes that cannot pace together).
    let svc = layer()
        .jitter(Jitter::Decorrelated)
        .pacing(false)
        .layer(fake.clone());
    let start = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(BODY))))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), 200);
    }
    let retries: Vec<Duration> = fake.seen()[100..].iter().map(|s| s.at - start).collect();
    assert_eq!(retries.len(), 100);
    assert!(
        retries.iter().all(|d| *d >= Duration::from_secs(1)),
        "never earlier than asked"
    );
    let distinct: std::collections::BTreeSet<u128> =
        retries.iter().map(|d| d.as_millis() / 10).collect();
    // 100 callers land in many different 10 ms slots instead of one instant.
    assert!(distinct.len() >= 50, "{} slots", distinct.len());
}

const HAIKU_BODY: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;

fn rate_limited_60_rpm() -> Step {
    Step::Reply(
        429,
        vec![
            ("retry-after", "1".into()),
            ("anthropic-ratelimit-requests-limit", "60".into()),
            ("anthropic-ratelimit-requests-remaining", "0".into()),
        ],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )
}

#[tokio::test(start_paused = true)]
async fn after_a_429_requests_on_the_quota_are_paced_one_admission_apart() {
    let fake = Fake::new([rate_limited_60_rpm()]);
    let svc = layer().layer(fake.clone());
    let start = Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(messages(BODY)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Four new requests on the same key and group while the first waits, and one on another
    // group.
    let queued: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(BODY))))
        .collect();
    let other = tokio::spawn(svc.clone().oneshot(messages(HAIKU_BODY)));
    assert_eq!(other.await.unwrap().unwrap().status(), 200);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    for q in queued {
        let resp = q.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.extensions().get::<RetryInfo>().unwrap().attempts(), 1);
    }
    let seen = fake.seen();
    assert_eq!(
        seen.len(),
        7,
        "no request was sent into the exhausted quota"
    );
    // The other group went at once.
    assert_eq!(seen[1].at - start, Duration::from_millis(10));
    let mut sends: Vec<Duration> = seen[2..].iter().map(|s| s.at - start).collect();
    sends.sort();
    // The retry after at least the server's second, then one 60 RPM admission (1 s, +10 %
    // margin) apart.
    assert!(sends[0] >= Duration::from_secs(1) && sends[0] <= Duration::from_secs(2));
    for pair in sends.windows(2) {
        assert_eq!(pair[1] - pair[0], Duration::from_millis(1100), "{sends:?}");
    }

    // Without pacing the new requests go at once (and would hit the exhausted quota).
    let fake = Fake::new([rate_limited_60_rpm()]);
    let svc = layer().pacing(false).layer(fake.clone());
    let first = tokio::spawn(svc.clone().oneshot(messages(BODY)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    svc.clone().oneshot(messages(BODY)).await.unwrap();
    assert_eq!(fake.seen()[1].at, start);
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_paced_request_never_waits_past_its_deadline() {
    let fake = Fake::new([rate_limited_60_rpm()]);
    let svc = layer().layer(fake.clone());
    let first = tokio::spawn(svc.clone().oneshot(messages(BODY)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The next slot is a second away; this request may wait 100 ms at most: it goes at once.
    let start = Instant::now();
    let mut req = messages(BODY);
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(100)));
    let resp = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let info = resp.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(info.total_wait(), Duration::ZERO);
    assert_eq!(fake.seen()[1].at, start);
    // One that may wait long enough takes a slot.
    let mut req = messages(BODY);
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_secs(60)));
    let resp = svc.clone().oneshot(req).await.unwrap();
    assert!(resp.extensions().get::<RetryInfo>().unwrap().total_wait() >= Duration::from_secs(1));
    first.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn consecutive_429s_lengthen_waits_for_the_whole_key_and_group() {
    // Without server delays, the backoff base doubles per consecutive 429 on a key / group.
    let storm = |n| Fake::new((0..n).map(|_| status(429)));
    let quiet_layer = layer().jitter(Jitter::None).max_attempts(2);
    let fake = storm(1);
    send(quiet_layer.clone(), &fake, messages(BODY))
        .await
        .unwrap();
    let first = fake.seen()[1].at - fake.seen()[0].at;

    let hammered = layer().jitter(Jitter::None).max_attempts(2);
    let fake = storm(40);
    let svc = hammered.layer(fake.clone());
    // Twenty requests on the same key and group, each failing twice.
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(BODY))))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let fake = storm(1);
    let svc = hammered.layer(fake.clone());
    svc.oneshot(messages(BODY)).await.unwrap();
    let later = fake.seen()[1].at - fake.seen()[0].at;
    assert_eq!(first, Duration::from_millis(500));
    assert!(later > first * 4, "{later:?}");
}

#[tokio::test(start_paused = true)]
async fn deadline_stops_at_once_instead_of_sleeping_past_it() {
    let fake = Fake::new([Step::Reply(
        429,
        vec![("retry-after", "30".into())],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )]);
    let start = Instant::now();
    let (resp, info) = send(
        layer().deadline(Duration::from_secs(10)),
        &fake,
        messages(BODY),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(Instant::now(), start, "returned at once");
    assert_eq!(info.unwrap().outcome(), RetryOutcome::DeadlineExceeded);
    // The attempt saw the effective deadline.
    assert_eq!(
        fake.seen()[0].deadline,
        Some(Deadline::at(start + Duration::from_secs(10)))
    );

    // A request extension overrides the layer's default.
    let fake = Fake::new([Step::Fail, Step::Fail]);
    let mut req = messages(BODY);
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_millis(100)));
    let err = send(layer().deadline(Duration::from_secs(3600)), &fake, req)
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<RetryError>().unwrap().kind(),
        RetryErrorKind::DeadlineExceeded
    );
}

#[tokio::test(start_paused = true)]
async fn extreme_settings_do_not_panic() {
    let huge = RetryLayer::new()
        .seed(1)
        .max_attempts(0)
        .max_delay(Duration::MAX)
        .deadline(Duration::MAX)
        .base_delay(Duration::MAX)
        .max_backoff(Duration::MAX)
        .spread(Duration::MAX);
    let fake = Fake::new([Step::Reply(
        429,
        vec![
            ("retry-after", "99999999999".into()),
            ("anthropic-ratelimit-requests-limit", "1".into()),
        ],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )]);
    // max_attempts(0) means one attempt.
    let (resp, info) = send(huge.clone(), &fake, messages(BODY)).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(info.unwrap().attempts(), 1);

    let fake = Fake::new([
        status(529),
        Step::Reply(
            429,
            vec![("retry-after", "99999999999".into())],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        ),
    ]);
    let mut req = messages(BODY);
    req.extensions_mut().insert(Deadline::after(Duration::MAX));
    let (resp, info) = send(huge.max_attempts(3), &fake, req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Every wait was capped at one day.
    assert!(info.unwrap().total_wait() <= Duration::from_secs(2 * 24 * 3600));
}

#[tokio::test(start_paused = true)]
async fn budget_holds_under_a_total_failure_storm() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
    let fake = Fake::new(std::iter::repeat_n(status(529), 100_000));
    let svc = layer().budget(budget).layer(fake.clone());
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.clone().oneshot(messages(BODY))))
        .collect();
    let mut budget_stops = 0;
    for t in tasks {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(resp.status(), 529);
        let info = resp.extensions().get::<RetryInfo>().unwrap();
        if info.outcome() == RetryOutcome::BudgetExhausted {
            budget_stops += 1;
        }
    }
    let attempts = fake.attempts();
    // 1,000 requests, at most 20 % retries on top.
    assert!(attempts <= 1200, "{attempts} attempts");
    assert!(attempts > 1000, "the budget allowed some retries");
    assert!(budget_stops >= 800, "{budget_stops}");
}

#[tokio::test(start_paused = true)]
async fn stream_error_before_content_is_retried_invisibly() {
    let fake = Fake::new([
        Step::Stream(vec![SSE_START, SSE_PING, SSE_ERROR], false),
        // A stream cut before content is retried too.
        Step::Stream(vec![SSE_START], true),
        Step::Stream(vec![SSE_START, SSE_BLOCK, SSE_DELTA, SSE_END], false),
    ]);
    let (resp, info) = send(layer(), &fake, messages(STREAM_BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.attempts(), 3);
    let text = std::str::from_utf8(resp.body()).unwrap();
    assert_eq!(text, [SSE_START, SSE_BLOCK, SSE_DELTA, SSE_END].concat());
    assert_eq!(info.unwrap().last_error_message(), None);
}

#[tokio::test(start_paused = true)]
async fn stream_error_after_content_passes_through() {
    let fake = Fake::new([Step::Stream(
        vec![SSE_START, SSE_BLOCK, SSE_DELTA, SSE_ERROR],
        false,
    )]);
    let (resp, info) = send(layer(), &fake, messages(STREAM_BODY)).await.unwrap();
    assert_eq!(fake.attempts(), 1);
    let text = std::str::from_utf8(resp.body()).unwrap();
    assert_eq!(text, [SSE_START, SSE_BLOCK, SSE_DELTA, SSE_ERROR].concat());
    assert_eq!(info.unwrap().attempts(), 1);

    // Content, then the body failure, reach the caller in order; the failure as an
    // `event: error` the SDKs understand (issue 18: it used to be a body error, which a proxy
    // turns into a silent cut), then a clean end.
    let fake = Fake::new([Step::Stream(vec![SSE_START, SSE_BLOCK, SSE_DELTA], true)]);
    let resp = layer()
        .layer(fake.clone())
        .oneshot(messages(STREAM_BODY))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap()),
            Some(Err(e)) => panic!("a body error reached the caller: {e}"),
            None => break,
        }
    }
    let got = String::from_utf8(got).unwrap();
    let forwarded = [SSE_START, SSE_BLOCK, SSE_DELTA].concat();
    assert!(got.starts_with(&forwarded), "{got}");
    let tail = &got[forwarded.len()..];
    assert!(tail.starts_with("event: error\ndata: "), "{tail}");
    assert!(tail.contains(r#""type":"api_error""#), "{tail}");
    assert!(
        tail.contains("upstream stream ended before message_stop"),
        "{tail}"
    );
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_json_answer_to_a_streaming_request_is_not_held_back() {
    let fake = Fake::new([ok()]);
    let (resp, info) = send(layer(), &fake, messages(STREAM_BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(info.unwrap().attempts(), 1);
    assert_eq!(fake.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_hold_back_stream_errors_are_not_retried() {
    let fake = Fake::new([Step::Stream(vec![SSE_START, SSE_ERROR], false)]);
    let (resp, _) = send(
        layer().hold_back_stream(false),
        &fake,
        messages(STREAM_BODY),
    )
    .await
    .unwrap();
    assert_eq!(fake.attempts(), 1);
    assert_eq!(resp.body(), [SSE_START, SSE_ERROR].concat().as_bytes());
}

/// Issue 18 changed this: a stream that failed before any content on the last attempt used
/// to be returned as received (a 200 whose body is an error); nothing of it was forwarded, so
/// the caller now gets the stream's error as an error status and envelope.
#[tokio::test(start_paused = true)]
async fn stream_error_on_the_last_attempt_is_returned_as_an_error_status() {
    let fake = Fake::new([
        Step::Stream(vec![SSE_START, SSE_ERROR], false),
        Step::Stream(vec![SSE_START, SSE_PING, SSE_ERROR], false),
    ]);
    let (resp, info) = send(layer().max_attempts(2), &fake, messages(STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let error = ApiError::from_response(resp.status(), resp.body());
    assert_eq!(error.error_type(), "overloaded_error");
    assert_eq!(error.message(), "Overloaded");
    let info = info.unwrap();
    assert_eq!(info.outcome(), RetryOutcome::Exhausted);
    assert_eq!(info.last_error_message(), Some("Overloaded"));
}

mod deadline_property {
    use super::*;
    use proptest::prelude::*;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..40).prop_map(|s| Step::Reply(
                429,
                vec![("retry-after", s.to_string())],
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            )),
            // A 429 with limits: paced.
            (0u64..5, 1u64..120).prop_map(|(s, rpm)| Step::Reply(
                429,
                vec![
                    ("retry-after", s.to_string()),
                    ("anthropic-ratelimit-requests-limit", rpm.to_string()),
                    ("anthropic-ratelimit-requests-remaining", "0".to_string()),
                ],
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            )),
            (0u64..20_000).prop_map(|ms| Step::Reply(
                529,
                vec![("retry-after-ms", ms.to_string())],
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            )),
            Just(status(529)),
            Just(status(500)),
            Just(Step::Fail),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the upstream says, and however requests share the layer's pacing, no wait
        /// crosses a request's deadline: every attempt after the first starts no later than
        /// the deadline (the first is always sent, at once when its pacing slot would be
        /// late), and each request is answered no later than its deadline plus one attempt.
        #[test]
        fn no_wait_crosses_the_deadline(
            steps in proptest::collection::vec(step(), 1..16),
            tasks in proptest::collection::vec((0u64..120_000, 0u64..3_000, any::<bool>()), 1..5),
            latency_ms in 0u64..2_000,
            seed in any::<u64>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut fake = Fake::new(steps);
                fake.latency = Duration::from_millis(latency_ms);
                let layer = RetryLayer::new().seed(seed).max_attempts(12);
                let mut handles = Vec::new();
                for (i, (deadline_ms, start_ms, per_request)) in tasks.iter().copied().enumerate() {
                    let deadline = Duration::from_millis(deadline_ms);
                    // Per-request deadlines, or the layer's default (a layer of its own, sharing
                    // nothing), on requests that start at different times.
                    let svc = if per_request {
                        layer.layer(fake.clone())
                    } else {
                        layer.clone().deadline(deadline).layer(fake.clone())
                    };
                    handles.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(start_ms)).await;
                        let start = Instant::now();
                        let mut req = messages(BODY);
                        req.headers_mut().insert("x-task", i.to_string().parse().unwrap());
                        if per_request {
                            req.extensions_mut().insert(Deadline::at(start + deadline));
                        }
                        let _ = svc.oneshot(req).await;
                        (start, start + deadline, Instant::now())
                    }));
                }
                let mut ends = Vec::new();
                for h in handles {
                    ends.push(h.await.unwrap());
                }
                let seen = fake.seen();
                for (i, (start, deadline, end)) in ends.into_iter().enumerate() {
                    let attempts: Vec<Instant> = seen
                        .iter()
                        .filter(|s| s.task.as_deref() == Some(i.to_string().as_str()))
                        .map(|s| s.at)
                        .collect();
                    prop_assert!(!attempts.is_empty());
                    for at in &attempts {
                        prop_assert!(*at <= deadline.max(start), "an attempt started after the deadline");
                    }
                    prop_assert!(end <= deadline.max(start) + fake.latency);
                }
                Ok(())
            })?;
        }
    }
}

/// The same classifications against the simulator's real envelopes and headers.
#[cfg(feature = "testing")]
mod simulator {
    use super::*;
    use tower_claude::testing::{Fault, MockClaude};

    fn mock() -> MockClaude {
        MockClaude::builder().seed(3).build()
    }

    async fn call(
        layer: RetryLayer,
        mock: &MockClaude,
        body: &'static str,
    ) -> Result<(Response<Bytes>, RetryInfo), BoxError> {
        let resp = layer.layer(mock.clone()).oneshot(messages(body)).await?;
        let (parts, body) = resp.into_parts();
        let info = parts.extensions.get::<RetryInfo>().cloned().unwrap();
        let bytes = body.collect().await?.to_bytes();
        Ok((Response::from_parts(parts, bytes), info))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_faults_are_retried_and_rate_limits_waited_for() {
        let mock = mock();
        for fault in [
            Fault::Overloaded,
            Fault::ServerError,
            Fault::RateLimited {
                retry_after: Duration::from_secs(3),
            },
            Fault::Status(503),
            Fault::Status(408),
        ] {
            mock.push_fault(fault);
        }
        let (resp, info) = call(layer(), &mock, BODY).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(info.attempts(), 6);
        assert!(info.total_wait() >= Duration::from_secs(3));
        assert_eq!(mock.stats().by_status.get(&200), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn client_errors_and_the_spend_cap_are_not_retried() {
        let mock = mock();
        mock.push_fault(Fault::Status(400));
        let (resp, info) = call(layer(), &mock, BODY).await.unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(info.outcome(), RetryOutcome::NotRetryable);

        mock.push_fault(Fault::SpendCap);
        let err = call(layer(), &mock, BODY).await.unwrap_err();
        let err = err.downcast_ref::<RetryError>().unwrap();
        assert_eq!(err.kind(), RetryErrorKind::SpendLimit);
        assert_eq!(
            err.api_error().unwrap().error_code(),
            Some("enforced_spend_limit_reached")
        );
        assert!(err.request_id().is_some());
        assert_eq!(mock.stats().received, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_failing_after_content_is_forwarded_as_it_is() {
        let mock = mock();
        mock.push_fault(Fault::MidStreamError);
        let (resp, info) = call(layer(), &mock, STREAM_BODY).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(info.attempts(), 1);
        let text = std::str::from_utf8(resp.body()).unwrap();
        assert!(text.contains("content_block_delta"), "{text}");
        assert!(text.contains("event: error"), "{text}");
        assert_eq!(mock.stats().received, 1);
    }
}

/// 1,000 tasks against the simulator with 10 % 529s and a tight quota: this layer loses none;
/// an SDK-like policy (2 retries, server delay honoured up to 60 s, else
/// `min(0.5 * 2^n, 8)` s shortened by up to 25 %) measured on an identical simulator loses
/// some.
#[cfg(feature = "testing")]
mod batch {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_claude::testing::{MockBody, MockClaude, MockLimits};

    const TASKS: usize = 1000;

    /// The simulator: 10 % 529s, answers of 100 tokens in about 0.7 s, and `rpm` requests per
    /// minute for the group.
    fn simulator(rpm: u64) -> MockClaude {
        MockClaude::builder()
            .limits(
                "claude-sonnet-4-6",
                MockLimits {
                    rpm,
                    itpm: 400_000,
                    otpm: 120_000,
                },
            )
            .seed(2026)
            .overloaded_rate(0.1)
            .latency(Duration::from_millis(200), Duration::from_millis(5))
            .output_tokens(100)
            .build()
    }

    fn task(i: usize) -> Request<RequestBody> {
        let stream = i % 4 == 0;
        let body = format!(
            r#"{{"model":"claude-sonnet-4-6","max_tokens":150,"stream":{stream},"messages":[{{"role":"user","content":"Task {i}: write a function that adds two numbers."}}]}}"#
        );
        Request::post("https://api.anthropic.com/v1/messages")
            .header("x-api-key", "sk-ant-batch")
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(RequestBody::from(body))
            .unwrap()
    }

    /// Whether a response is a finished task: 200 and a complete body.
    async fn finished<B>(resp: Response<B>) -> bool
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        if resp.status() != StatusCode::OK {
            return false;
        }
        match resp.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                let text = String::from_utf8_lossy(&body);
                text.contains("message_stop") || text.contains(r#""type":"message""#)
            }
            Err(_) => false,
        }
    }

    /// Runs `TASKS` tasks on `workers` workers; returns how many were lost.
    async fn run_batch<F, Fut>(workers: usize, one: F) -> usize
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let next = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..workers)
            .map(|_| {
                let (next, lost, one) = (next.clone(), lost.clone(), one.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= TASKS {
                            break;
                        }
                        if !one(i).await {
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        lost.load(Ordering::SeqCst)
    }

    /// The official SDKs' policy, as a reference loop.
    async fn sdk_like(
        mock: MockClaude,
        req: Request<RequestBody>,
        rng: Arc<Mutex<fastrand::Rng>>,
    ) -> bool {
        let (parts, body) = req.into_parts();
        for retries in 0..=2u32 {
            let mut attempt = Request::new(body.clone());
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = parts.uri.clone();
            *attempt.headers_mut() = parts.headers.clone();
            let resp: Response<MockBody> = match mock.clone().oneshot(attempt).await {
                Ok(resp) => resp,
                Err(_) => continue,
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            if status.is_success() {
                return finished(resp).await;
            }
            let retry = match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
                Some("true") => true,
                Some("false") => false,
                _ => matches!(status.as_u16(), 408 | 409 | 429) || status.as_u16() >= 500,
            };
            if !retry || retries == 2 {
                return false;
            }
            let server = tower_claude::anthropic::retry_after(&headers, SystemTime::now())
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60));
            let delay = server.unwrap_or_else(|| {
                let jitter = 1.0 - 0.25 * rng.lock().unwrap().f64();
                Duration::from_secs_f64((0.5 * 2f64.powi(retries as i32)).min(8.0) * jitter)
            });
            tokio::time::sleep(delay).await;
        }
        false
    }

    /// Runs the batch with both policies on identical simulators; returns (ours, sdk) lost.
    async fn compare(workers: usize, rpm: u64) -> (usize, usize) {
        let reference = simulator(rpm);
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(11)));
        let start = Instant::now();
        let sdk_lost = {
            let mock = reference.clone();
            run_batch(workers, move |i| {
                sdk_like(mock.clone(), task(i), rng.clone())
            })
            .await
        };
        let sdk_time = start.elapsed();

        let mock = simulator(rpm);
        let svc = RetryLayer::new().seed(11).layer(mock.clone());
        let start = Instant::now();
        let ours_lost = run_batch(workers, move |i| {
            let svc = svc.clone();
            async move {
                match svc.oneshot(task(i)).await {
                    Ok(resp) => finished(resp).await,
                    Err(_) => false,
                }
            }
        })
        .await;
        let ours_time = start.elapsed();
        let (sdk_stats, our_stats) = (reference.stats(), mock.stats());
        println!(
            "{TASKS} tasks, {workers} workers, {rpm} RPM, 10% 529s: RetryLayer lost {ours_lost} \
             ({:.0?} simulated, {} upstream calls, statuses {:?}); SDK-like policy lost \
             {sdk_lost} ({:.0?} simulated, {} upstream calls, statuses {:?})",
            ours_time,
            our_stats.received,
            our_stats.by_status,
            sdk_time,
            sdk_stats.received,
            sdk_stats.by_status,
        );
        assert_eq!(our_stats.accepted as usize, TASKS - ours_lost);
        (ours_lost, sdk_lost)
    }

    #[tokio::test(start_paused = true)]
    async fn thousand_tasks_none_lost_versus_sdk_like_policy() {
        // 32 workers want about 2,700 requests a minute from a 600 RPM quota.
        let (ours, sdk) = compare(32, 600).await;
        assert_eq!(ours, 0);
        assert!(sdk > 0, "the reference policy should lose tasks here");
        // 16 workers on 100 RPM: a quota fourteen times too small.
        let (ours, sdk) = compare(16, 100).await;
        assert_eq!(ours, 0);
        assert!(sdk > 0, "the reference policy should lose tasks here");
    }
}

/// A fallback layer above sets `MaxServerWait` while a lower model is left: a 429 asking for
/// a longer wait comes back at once instead of being waited out; a short one is still retried.
#[tokio::test(start_paused = true)]
async fn max_server_wait_returns_long_429s_at_once() {
    let long_429 = || {
        Step::Reply(
            429,
            vec![("retry-after", "30".into())],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        )
    };
    let fake = Fake::new([long_429()]);
    let mut req = messages(BODY);
    req.extensions_mut()
        .insert(MaxServerWait(Duration::from_secs(10)));
    let start = Instant::now();
    let (resp, info) = send(layer(), &fake, req).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(fake.attempts(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(info.unwrap().outcome(), RetryOutcome::WaitTooLong);

    // Within the bound the layer waits and retries as usual.
    let fake = Fake::new([Step::Reply(
        429,
        vec![("retry-after", "3".into())],
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
    )]);
    let mut req = messages(BODY);
    req.extensions_mut()
        .insert(MaxServerWait(Duration::from_secs(10)));
    let (resp, info) = send(layer(), &fake, req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(info.unwrap().attempts(), 2);

    // Without the extension the long wait is honoured.
    let fake = Fake::new([long_429()]);
    let (resp, _) = send(layer(), &fake, messages(BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = fake.seen();
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(30));
}

/// What a hand-made hostile upstream does after accepting a request.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Never answers.
    Silent,
    /// A 200 stream: `message_start`, then a `ping` every second, forever.
    PingForever,
    /// A 200 stream with content, then a `ping` every second, forever.
    ContentThenPings,
    /// A 200 JSON answer sent one byte a second.
    Trickle,
}

fn hostile(
    kind: Hostile,
) -> impl Service<
    Request<RequestBody>,
    Response = Response<Body>,
    Error = BoxError,
    Future = futures_util::future::BoxFuture<'static, Result<Response<Body>, BoxError>>,
> + Clone {
    tower::service_fn(move |_req: Request<RequestBody>| {
        let fut: futures_util::future::BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(async move {
                let (content_type, first, then): (&str, Vec<Bytes>, Bytes) = match kind {
                    Hostile::Silent => std::future::pending().await,
                    Hostile::PingForever => (
                        "text/event-stream",
                        vec![Bytes::from_static(SSE_START.as_bytes())],
                        Bytes::from_static(SSE_PING.as_bytes()),
                    ),
                    Hostile::ContentThenPings => (
                        "text/event-stream",
                        [SSE_START, SSE_BLOCK, SSE_DELTA]
                            .map(|s| Bytes::from_static(s.as_bytes()))
                            .to_vec(),
                        Bytes::from_static(SSE_PING.as_bytes()),
                    ),
                    Hostile::Trickle => ("application/json", vec![], Bytes::from_static(b" ")),
                };
                let head = futures_util::stream::iter(
                    first.into_iter().map(|b| Ok::<_, BoxError>(Frame::data(b))),
                );
                let tail = futures_util::stream::unfold(then, |then| async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Some((Ok::<_, BoxError>(Frame::data(then.clone())), then))
                });
                let body = StreamBody::new(futures_util::StreamExt::chain(head, tail));
                Ok(Response::builder()
                    .status(200)
                    .header("content-type", content_type)
                    .body(BodyExt::boxed(body))?)
            });
        fut
    })
}

/// Issue 18, bug 1: the deadline covers the upstream. An upstream that never answers, a stream
/// that sends only pings after `message_start` (held back by the layer), and a JSON body
/// trickled byte by byte all end at the deadline with a typed deadline error (the proxy
/// answers it 504 `timeout_error`), not when the client gives up.
#[tokio::test(start_paused = true)]
async fn the_deadline_covers_an_upstream_that_hangs_pings_or_trickles() {
    for (kind, body) in [
        (Hostile::Silent, BODY),
        (Hostile::PingForever, STREAM_BODY),
        (Hostile::Trickle, BODY),
    ] {
        let start = Instant::now();
        let svc = layer()
            .deadline(Duration::from_secs(5))
            .layer(hostile(kind));
        // Bounded, so that a layer that waits without end fails the test instead of hanging.
        let err = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(messages(body)))
            .await
            .expect("ended by the deadline")
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(5), "{kind:?}");
        let err = err.downcast_ref::<RetryError>().expect("a RetryError");
        assert_eq!(err.kind(), RetryErrorKind::DeadlineExceeded, "{kind:?}");
        assert_eq!(err.attempts(), 1);
        assert!(std::error::Error::source(err).is_none());
    }
}

/// Issue 18, bug 1: a stream already forwarded that is still running at the deadline ends
/// there with an `event: error` of type `timeout_error`, not a silent cut or a wait without
/// end.
#[tokio::test(start_paused = true)]
async fn a_forwarded_stream_still_running_at_the_deadline_ends_with_an_error_event() {
    let start = Instant::now();
    let svc = layer()
        .deadline(Duration::from_secs(5))
        .layer(hostile(Hostile::ContentThenPings));
    let resp = svc.oneshot(messages(STREAM_BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
        .await
        .expect("ended by the deadline")
        .unwrap()
        .to_bytes();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.starts_with(&[SSE_START, SSE_BLOCK, SSE_DELTA].concat()));
    let tail = text.rsplit("\n\n").nth(1).unwrap();
    assert!(tail.starts_with("event: error\ndata: "), "{tail}");
    assert!(tail.contains(r#""type":"timeout_error""#), "{tail}");
}

/// Issue 18: a stream cut before any content on every attempt is answered with an error
/// status and envelope, not a 200 with an empty, broken body; so is a JSON answer cut short.
#[tokio::test(start_paused = true)]
async fn a_stream_cut_before_content_on_every_attempt_is_an_error_status() {
    let fake = Fake::new([
        Step::Stream(vec![SSE_START], true),
        Step::Stream(vec![SSE_START, SSE_PING], false),
    ]);
    let (resp, info) = send(layer().max_attempts(2), &fake, messages(STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let error = ApiError::from_response(resp.status(), resp.body());
    assert_eq!(error.error_type(), "api_error");
    assert_eq!(error.message(), "upstream stream ended before message_stop");
    assert_eq!(info.unwrap().outcome(), RetryOutcome::Exhausted);
    assert_eq!(fake.attempts(), 2);
}

/// Issue 18: a stream that ends cleanly after content but without `message_stop` (a silent
/// truncation) ends with an `event: error` the SDKs raise.
#[tokio::test(start_paused = true)]
async fn a_stream_ending_without_message_stop_ends_with_an_error_event() {
    let fake = Fake::new([Step::Stream(vec![SSE_START, SSE_BLOCK, SSE_DELTA], false)]);
    let (resp, _) = send(layer(), &fake, messages(STREAM_BODY)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = std::str::from_utf8(resp.body()).unwrap();
    let forwarded = [SSE_START, SSE_BLOCK, SSE_DELTA].concat();
    assert!(text.starts_with(&forwarded));
    assert!(
        text[forwarded.len()..].starts_with("event: error\ndata: "),
        "{text}"
    );
    assert!(text.contains("upstream stream ended before message_stop"));
    // A complete stream gets nothing added.
    let fake = Fake::new([Step::Stream(
        vec![SSE_START, SSE_BLOCK, SSE_DELTA, SSE_END],
        false,
    )]);
    let (resp, _) = send(layer(), &fake, messages(STREAM_BODY)).await.unwrap();
    assert_eq!(
        resp.body(),
        [SSE_START, SSE_BLOCK, SSE_DELTA, SSE_END]
            .concat()
            .as_bytes()
    );
}

/// An error answer whose envelope a layer below already read (`ErrorAnswer`) is classified
/// from that extension, not read again: here the extension says spend cap while the body says
/// rate limit, and the layer fails at once with `SpendLimit`.
#[tokio::test(start_paused = true)]
async fn an_error_answer_read_below_is_not_read_again() {
    use tower_claude::anthropic::ApiErrorKind;
    use tower_claude::exchange::ErrorAnswer;
    let calls = Arc::new(Mutex::new(0u32));
    let seen = calls.clone();
    let inner = tower::service_fn(move |_req: Request<RequestBody>| {
        *seen.lock().unwrap() += 1;
        async move {
            let mut res = Response::new(Full::new(Bytes::from_static(
                br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            )));
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.extensions_mut().insert(ErrorAnswer::from(ApiError::new(
                ApiErrorKind::SpendLimit,
                "cap",
            )));
            Ok::<_, BoxError>(res)
        }
    });
    let mut svc = layer().layer(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(messages(BODY))
        .await
        .unwrap_err();
    let err = err.downcast::<RetryError>().unwrap();
    assert_eq!(err.kind(), RetryErrorKind::SpendLimit);
    assert_eq!(err.api_error().map(ApiError::message), Some("cap"));
    assert_eq!(*calls.lock().unwrap(), 1);
}
