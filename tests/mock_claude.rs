//! Service-level tests of `tower_claude::testing::MockClaude`.
#![cfg(feature = "testing")]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tower_claude::anthropic::{
    ApiError, ApiErrorKind, ModelCatalog, RateLimitSnapshot, RequestMeta, SseParser, StreamTracker,
    Usage,
};
use tower_claude::body::RequestBody;
use tower_claude::testing::{Fault, MAX_BODY_BYTES, MockBody, MockClaude, MockLimits};

const MODEL: &str = "claude-sonnet-4-6";
const KEY: &str = "sk-ant-test-key";

fn body(max_tokens: u64, stream: bool) -> String {
    format!(
        r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"Tell me about token buckets and why they refill continuously."}}]}}"#
    )
}

fn input_estimate(body: &str) -> u64 {
    RequestMeta::scan(body.as_bytes()).unwrap().input_tokens
}

fn request_to(path: &str, key: &str, body: impl Into<RequestBody>) -> Request<RequestBody> {
    Request::post(path)
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn request(body: String) -> Request<RequestBody> {
    request_to("/v1/messages", KEY, body)
}

async fn call(mock: &MockClaude, req: Request<RequestBody>) -> Response<MockBody> {
    mock.clone().oneshot(req).await.unwrap()
}

async fn read(res: Response<MockBody>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

fn group_name() -> String {
    ModelCatalog::default().group(MODEL).as_str().to_owned()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
}

fn error_of(status: StatusCode, bytes: &[u8]) -> ApiError {
    ApiError::from_response(status, bytes)
}

#[tokio::test(start_paused = true)]
async fn json_answer_has_the_real_shape_and_usage() {
    let mock = MockClaude::builder().output_tokens(42).build();
    let b = body(1024, false);
    let (status, headers, bytes) = read(call(&mock, request(b.clone())).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert!(header(&headers, "request-id").starts_with("req_"));

    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert!(json["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(json["type"], "message");
    assert_eq!(json["role"], "assistant");
    assert_eq!(json["model"], MODEL);
    assert_eq!(json["stop_reason"], "end_turn");
    assert!(json["stop_sequence"].is_null());
    assert_eq!(json["content"][0]["type"], "text");
    let text = json["content"][0]["text"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 42);

    let usage = Usage::from_json(&bytes).unwrap();
    assert_eq!(usage.input_tokens, input_estimate(&b));
    assert_eq!(usage.output_tokens, 42);
    assert_eq!(usage.cache_creation_input_tokens, 0);
    assert_eq!(usage.cache_read_input_tokens, 0);

    let snap = RateLimitSnapshot::from_headers(&headers);
    let limits = MockLimits::default();
    assert_eq!(snap.requests.limit, Some(limits.rpm));
    assert_eq!(snap.requests.remaining, Some(limits.rpm - 1));
    assert_eq!(snap.input_tokens.limit, Some(limits.itpm));
    assert_eq!(snap.output_tokens.limit, Some(limits.otpm));
    // Token counts are rounded down to thousands.
    assert_eq!(snap.input_tokens.remaining, Some(1_999_000));
    assert_eq!(snap.output_tokens.remaining, Some(398_000)); // 400 000 - 1 024 reserved
    assert!(snap.tokens.limit.is_some());
}

#[tokio::test(start_paused = true)]
async fn answer_is_cut_at_max_tokens() {
    let mock = MockClaude::builder().output_tokens(100).build();
    let (status, _, bytes) = read(call(&mock, request(body(7, false))).await).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["stop_reason"], "max_tokens");
    assert_eq!(Usage::from_json(&bytes).unwrap().output_tokens, 7);
}

#[tokio::test(start_paused = true)]
async fn ids_are_deterministic_per_seed() {
    async fn ids(seed: u64) -> (String, String) {
        let mock = MockClaude::builder().seed(seed).build();
        let (_, headers, bytes) = read(call(&mock, request(body(16, false))).await).await;
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        (
            json["id"].as_str().unwrap().to_owned(),
            header(&headers, "request-id").to_owned(),
        )
    }
    assert_eq!(ids(3).await, ids(3).await);
    assert_ne!(ids(3).await, ids(4).await);
}

#[tokio::test(start_paused = true)]
async fn sse_answer_has_the_real_event_sequence() {
    let mock = MockClaude::builder().output_tokens(23).build();
    let b = body(1024, true);
    let (status, headers, bytes) = read(call(&mock, request(b.clone())).await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(header(&headers, "content-type").starts_with("text/event-stream"));

    let mut parser = SseParser::new();
    let mut events = Vec::new();
    parser.push(&bytes, &mut events);
    parser.finish(&mut events);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    // 23 tokens in deltas of 5: 5 deltas.
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 5));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for e in &events {
        let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(data["type"], e.event.as_deref().unwrap());
    }
    let text: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| {
            let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(data["delta"]["type"], "text_delta");
            data["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text.split(' ').count(), 23);

    let mut tracker = StreamTracker::new();
    for piece in bytes.chunks(7) {
        tracker.feed(piece);
    }
    tracker.finish();
    assert!(tracker.is_complete());
    assert!(tracker.content_started());
    assert!(tracker.error().is_none());
    assert_eq!(tracker.usage().input_tokens, input_estimate(&b));
    assert_eq!(tracker.usage().output_tokens, 23);
}

#[tokio::test(start_paused = true)]
async fn latency_paces_json_and_sse() {
    let mock = MockClaude::builder()
        .latency(Duration::from_millis(200), Duration::from_millis(10))
        .output_tokens(20)
        .build();

    // JSON: the whole answer after base + 20 * per token.
    let start = Instant::now();
    let res = call(&mock, request(body(64, false))).await;
    assert_eq!(start.elapsed(), Duration::from_millis(400));
    read(res).await;

    // SSE: head at once, message_start at base, each delta when its tokens are generated.
    let start = Instant::now();
    let res = call(&mock, request(body(64, true))).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    let mut body = res.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        let name = std::str::from_utf8(&data)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned();
        arrivals.push((name, start.elapsed().as_millis()));
    }
    let at = |i: usize| arrivals[i].1;
    assert_eq!(arrivals[0], ("event: message_start".to_owned(), 200));
    assert_eq!(at(3), 250); // first delta: 5 tokens
    assert_eq!(at(4), 300);
    assert_eq!(at(6), 400); // fourth (last) delta
    assert_eq!(
        arrivals.last().unwrap(),
        &("event: message_stop".to_owned(), 400)
    );
    assert_eq!(arrivals.len(), 3 + 4 + 3);
}

#[tokio::test(start_paused = true)]
async fn count_tokens_answers_the_estimate_and_charges_nothing() {
    let mock = MockClaude::builder().build();
    let b = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"How many tokens is this?"}}]}}"#
    );
    let res = call(
        &mock,
        request_to("/v1/messages/count_tokens", KEY, b.clone()),
    )
    .await;
    let (status, _, bytes) = read(res).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        json,
        serde_json::json!({ "input_tokens": input_estimate(&b) })
    );
    let stats = mock.stats();
    assert_eq!(stats.accepted, 0);
    assert!(stats.input_tokens.is_empty());
}

#[tokio::test(start_paused = true)]
async fn invalid_requests_get_the_official_envelope() {
    let mock = MockClaude::builder().api_keys(["sk-good"]).build();
    let good = body(16, false);
    let cases: Vec<(&str, Request<RequestBody>, StatusCode, ApiErrorKind)> = vec![
        (
            "no key",
            Request::post("/v1/messages")
                .header("anthropic-version", "2023-06-01")
                .body(RequestBody::from(good.clone()))
                .unwrap(),
            StatusCode::UNAUTHORIZED,
            ApiErrorKind::Authentication,
        ),
        (
            "empty key",
            request_to("/v1/messages", "", good.clone()),
            StatusCode::UNAUTHORIZED,
            ApiErrorKind::Authentication,
        ),
        (
            "unknown key",
            request_to("/v1/messages", "sk-bad", good.clone()),
            StatusCode::UNAUTHORIZED,
            ApiErrorKind::Authentication,
        ),
        (
            "no version",
            Request::post("/v1/messages")
                .header("x-api-key", "sk-good")
                .body(RequestBody::from(good.clone()))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "malformed json",
            request_to("/v1/messages", "sk-good", r#"{"model": "x", "#),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "not an object",
            request_to("/v1/messages", "sk-good", "[1,2]"),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "no model",
            request_to(
                "/v1/messages",
                "sk-good",
                r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
            ),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "no max_tokens",
            request_to(
                "/v1/messages",
                "sk-good",
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            ),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "max_tokens not a number",
            request_to(
                "/v1/messages",
                "sk-good",
                r#"{"model":"m","max_tokens":"5","messages":[{"role":"user","content":"x"}]}"#,
            ),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "no messages",
            request_to("/v1/messages", "sk-good", r#"{"model":"m","max_tokens":5}"#),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "empty messages",
            request_to(
                "/v1/messages",
                "sk-good",
                r#"{"model":"m","max_tokens":5,"messages":[]}"#,
            ),
            StatusCode::BAD_REQUEST,
            ApiErrorKind::InvalidRequest,
        ),
        (
            "too large",
            request_to("/v1/messages", "sk-good", vec![b' '; MAX_BODY_BYTES + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorKind::RequestTooLarge,
        ),
        (
            "unknown path",
            request_to("/v1/complete", "sk-good", good.clone()),
            StatusCode::NOT_FOUND,
            ApiErrorKind::NotFound,
        ),
    ];
    let n = cases.len() as u64;
    for (name, req, status, kind) in cases {
        let (got, headers, bytes) = read(call(&mock, req).await).await;
        assert_eq!(got, status, "{name}");
        assert_eq!(
            header(&headers, "content-type"),
            "application/json",
            "{name}"
        );
        assert!(header(&headers, "request-id").starts_with("req_"), "{name}");
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["type"], "error", "{name}");
        assert!(json["error"]["message"].is_string(), "{name}");
        assert_eq!(error_of(got, &bytes).kind(), kind, "{name}");
    }

    // Recent official SDKs send the key as a bearer token.
    let bearer = |token: &str| {
        Request::post("/v1/messages")
            .header("authorization", format!("Bearer {token}"))
            .header("anthropic-version", "2023-06-01")
            .body(RequestBody::from(body(16, false)))
            .unwrap()
    };
    assert_eq!(
        call(&mock, bearer("sk-good")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&mock, bearer("sk-bad")).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // A wrong method on a known path.
    let get = Request::get("/v1/messages")
        .header("x-api-key", "sk-good")
        .body(RequestBody::empty())
        .unwrap();
    let (status, _, bytes) = read(call(&mock, get).await).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["type"],
        "error"
    );

    // The allowed key works; nothing invalid was charged or admitted.
    let (status, _, _) = read(call(&mock, request_to("/v1/messages", "sk-good", good)).await).await;
    assert_eq!(status, StatusCode::OK);
    let stats = mock.stats();
    assert_eq!(stats.received, n + 4);
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.by_status[&400], 8);
    assert_eq!(stats.by_status[&401], 4);
}

#[tokio::test(start_paused = true)]
async fn over_rpm_gets_429_with_retry_after_and_refills() {
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(3, 1_000_000, 1_000_000))
        .build();
    for remaining in [2, 1, 0] {
        let (status, headers, _) = read(call(&mock, request(body(16, false))).await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            header(&headers, "anthropic-ratelimit-requests-remaining"),
            remaining.to_string()
        );
    }
    let (status, headers, bytes) = read(call(&mock, request(body(16, false))).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_of(status, &bytes).kind(), ApiErrorKind::RateLimit);
    // 3 per minute: one request back every 20 s.
    assert_eq!(header(&headers, "retry-after"), "20");
    assert_eq!(
        header(&headers, "anthropic-ratelimit-requests-remaining"),
        "0"
    );
    assert_eq!(header(&headers, "anthropic-ratelimit-requests-limit"), "3");
    // Full again in 60 s (all three taken at the same instant).
    let reset = RateLimitSnapshot::from_headers(&headers)
        .requests
        .reset
        .unwrap();
    let in_secs = reset
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs_f64();
    assert!((58.0..=62.0).contains(&in_secs), "reset in {in_secs} s");

    tokio::time::advance(Duration::from_millis(19_900)).await;
    let (status, _, _) = read(call(&mock, request(body(16, false))).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::advance(Duration::from_millis(100)).await;
    let (status, _, _) = read(call(&mock, request(body(16, false))).await).await;
    assert_eq!(status, StatusCode::OK);
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 2);
    assert_eq!(stats.accepted, 4);
}

#[tokio::test(start_paused = true)]
async fn buckets_are_per_key_and_per_group() {
    let mock = MockClaude::builder()
        .default_limits(MockLimits::new(1, 1_000_000, 1_000_000))
        .build();
    let other_model = body(16, false).replace(MODEL, "claude-haiku-4-5");
    let (s1, _, _) = read(call(&mock, request(body(16, false))).await).await;
    let (s2, _, _) = read(call(&mock, request(body(16, false))).await).await;
    let (s3, _, _) = read(
        call(
            &mock,
            request_to("/v1/messages", "sk-other", body(16, false)),
        )
        .await,
    )
    .await;
    let (s4, _, _) = read(call(&mock, request(other_model)).await).await;
    assert_eq!([s1, s2, s3, s4].map(|s| s.as_u16()), [200, 429, 200, 200]);
}

#[tokio::test(start_paused = true)]
async fn limits_apply_to_the_whole_rate_limit_group() {
    // Named by group ("claude-opus-4", as `ModelCatalog::group` names it) or by a model id.
    let mock = MockClaude::builder()
        .limits("claude-opus-4", MockLimits::new(1, 1_000_000, 1_000_000))
        .limits(
            "claude-haiku-4-5-20251001",
            MockLimits::new(2, 1_000_000, 1_000_000),
        )
        .build();
    let for_model = |model: &str| request(body(16, false).replace(MODEL, model));
    let mut statuses = Vec::new();
    for model in [
        "claude-opus-4-7",
        "claude-opus-4-1-20250805", // same group: pooled
        "claude-haiku-4-5",
        "claude-haiku-4-5",
        "claude-haiku-4-5-20251001",
        MODEL, // default limits
    ] {
        statuses.push(call(&mock, for_model(model)).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 429, 200, 200, 429, 200]);
}

#[tokio::test(start_paused = true)]
async fn over_itpm_gets_429_and_refills() {
    let b = body(16, false);
    let est = input_estimate(&b);
    assert!(est >= 10);
    // Room for two requests and a half.
    let itpm = est * 5 / 2;
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(1_000, itpm, 1_000_000))
        .build();
    for _ in 0..2 {
        assert_eq!(
            read(call(&mock, request(b.clone())).await).await.0,
            StatusCode::OK
        );
    }
    let (status, headers, bytes) = read(call(&mock, request(b.clone())).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let message = error_of(status, &bytes).message().to_owned();
    assert!(message.contains("input tokens"), "{message}");
    // Missing: est - (itpm - 2 est) tokens at itpm / 60 per second.
    let missing = (est - (itpm - 2 * est)) as f64;
    let wait = missing / (itpm as f64 / 60.0);
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert_eq!(retry_after, wait.ceil() as u64);
    // The 429 took nothing: waiting exactly `wait` is enough.
    tokio::time::advance(Duration::from_secs_f64(wait) + Duration::from_millis(1)).await;
    assert_eq!(
        read(call(&mock, request(b.clone())).await).await.0,
        StatusCode::OK
    );
    assert_eq!(mock.stats().input_tokens[&group_name()], 3 * est);
}

#[tokio::test(start_paused = true)]
async fn output_is_reserved_from_max_tokens_and_refunded() {
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(1_000, 1_000_000, 1_000))
        .output_tokens(100)
        .build();
    // A stream reserving 600 of 1 000, held open.
    let first = call(&mock, request(body(600, true))).await;
    assert_eq!(first.status(), StatusCode::OK);
    // Another 600 does not fit while the first is in flight.
    let (status, headers, bytes) = read(call(&mock, request(body(600, false))).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(error_of(status, &bytes).message().contains("output tokens"));
    assert_eq!(
        header(&headers, "anthropic-ratelimit-output-tokens-remaining"),
        "0"
    ); // 400 -> 0
    // 200 missing at 1 000 / 60 per second: 12 s.
    assert_eq!(header(&headers, "retry-after"), "12");
    // The first answer ends: 500 of its 600 come back, without any time passing.
    let (_, _, stream) = read(first).await;
    let mut tracker = StreamTracker::new();
    tracker.feed(&stream);
    assert_eq!(tracker.usage().output_tokens, 100);
    let (status, _, _) = read(call(&mock, request(body(600, false))).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mock.stats().output_tokens[&group_name()], 200);
    // A max_tokens above the limit is still admitted (the reservation is capped).
    tokio::time::advance(Duration::from_secs(60)).await;
    let (status, _, _) = read(call(&mock, request(body(64_000, false))).await).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn random_faults_are_reproducible_with_a_seed() {
    async fn run(seed: u64) -> Vec<u16> {
        let mock = MockClaude::builder()
            .seed(seed)
            .overloaded_rate(0.3)
            .server_error_rate(0.2)
            .build();
        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(
                call(&mock, request(body(16, false)))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        let stats = mock.stats();
        assert_eq!(stats.by_status.values().sum::<u64>(), 60);
        assert_eq!(stats.accepted, stats.by_status[&200]);
        statuses
    }
    let a = run(11).await;
    assert_eq!(a, run(11).await);
    assert_ne!(a, run(12).await);
    let count = |code| a.iter().filter(|&&s| s == code).count();
    assert!(count(529) >= 8, "{a:?}");
    assert!(count(500) >= 4, "{a:?}");
    assert!(count(200) >= 15, "{a:?}");
    assert_eq!(count(200) + count(500) + count(529), 60);
}

#[tokio::test(start_paused = true)]
async fn faulted_requests_take_nothing_from_the_buckets() {
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(10, 1_000_000, 1_000_000))
        .overloaded_rate(1.0)
        .build();
    for _ in 0..20 {
        let (status, headers, bytes) = read(call(&mock, request(body(16, false))).await).await;
        assert_eq!(status.as_u16(), 529);
        assert_eq!(error_of(status, &bytes).kind(), ApiErrorKind::Overloaded);
        assert_eq!(
            header(&headers, "anthropic-ratelimit-requests-remaining"),
            "10"
        );
    }
    assert_eq!(mock.stats().accepted, 0);
    assert!(mock.stats().input_tokens.is_empty());
}

#[tokio::test(start_paused = true)]
async fn midstream_error_after_the_first_delta() {
    let mock = MockClaude::builder()
        .midstream_error_rate(1.0)
        .output_tokens(50)
        .build();
    let (status, _, bytes) = read(call(&mock, request(body(100, true))).await).await;
    assert_eq!(status, StatusCode::OK);
    let mut tracker = StreamTracker::new();
    tracker.feed(&bytes);
    tracker.finish();
    assert!(tracker.content_started());
    assert!(!tracker.is_complete());
    assert_eq!(tracker.error().unwrap().kind(), ApiErrorKind::Overloaded);
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert_eq!(text.matches("event: content_block_delta").count(), 1);
    assert!(text.ends_with("\n\n"));

    // The same fault on a JSON request is a 529.
    let (status, _, _) = read(call(&mock, request(body(100, false))).await).await;
    assert_eq!(status.as_u16(), 529);

    let stats = mock.stats();
    assert_eq!(stats.accepted, 1);
    // Charged the 5 tokens of the one delta sent.
    assert_eq!(stats.output_tokens[&group_name()], 5);
}

#[tokio::test(start_paused = true)]
async fn scripted_faults_come_first_and_in_order() {
    let mock = MockClaude::builder().build();
    mock.push_fault(Fault::Overloaded);
    mock.push_fault(Fault::ServerError);
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_millis(1_500),
    });
    mock.push_fault(Fault::SpendCap);
    mock.push_fault(Fault::Status(503));
    mock.push_fault(Fault::Status(200)); // not an error status: a 500
    mock.push_fault(Fault::MidStreamError);

    // Invalid requests do not consume the queue.
    let (status, _, _) = read(call(&mock, request_to("/v1/messages", KEY, "{")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(read(call(&mock, request(body(16, false))).await).await);
    }
    let kinds: Vec<(u16, ApiErrorKind)> = outcomes
        .iter()
        .map(|(s, _, b)| (s.as_u16(), error_of(*s, b).kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            (529, ApiErrorKind::Overloaded),
            (500, ApiErrorKind::Api),
            (429, ApiErrorKind::RateLimit),
            (429, ApiErrorKind::SpendLimit),
            (
                503,
                ApiErrorKind::from_status(StatusCode::SERVICE_UNAVAILABLE)
            ),
            (500, ApiErrorKind::Api),
        ]
    );
    assert_eq!(header(&outcomes[2].1, "retry-after"), "2");
    assert!(outcomes[3].1.get("retry-after").is_none());
    assert_eq!(
        error_of(outcomes[3].0, &outcomes[3].2).error_code(),
        Some("enforced_spend_limit_reached")
    );

    let (status, _, bytes) = read(call(&mock, request(body(16, true))).await).await;
    assert_eq!(status, StatusCode::OK);
    let mut tracker = StreamTracker::new();
    tracker.feed(&bytes);
    assert_eq!(
        tracker.error().map(ApiError::kind),
        Some(ApiErrorKind::Overloaded)
    );

    // Queue empty: back to normal.
    let (status, _, _) = read(call(&mock, request(body(16, true))).await).await;
    assert_eq!(status, StatusCode::OK);
    let stats = mock.stats();
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.by_status[&429], 2);
    assert_eq!(stats.accepted, 2);
}

#[tokio::test(start_paused = true)]
async fn spend_cap_mode_rejects_everything_until_lifted() {
    let mock = MockClaude::builder().spend_cap(true).build();
    for _ in 0..3 {
        let (status, headers, bytes) = read(call(&mock, request(body(16, false))).await).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(headers.get("retry-after").is_none());
        let err = error_of(status, &bytes);
        assert_eq!(err.kind(), ApiErrorKind::SpendLimit);
        assert!(!err.kind().is_retryable());
    }
    mock.set_spend_cap(false);
    assert_eq!(
        read(call(&mock, request(body(16, false))).await).await.0,
        StatusCode::OK
    );
    assert_eq!(mock.stats().rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn in_flight_cap_holds_until_the_body_ends() {
    let mock = MockClaude::builder()
        .max_in_flight(Some(2))
        .latency(Duration::from_millis(100), Duration::from_millis(10))
        .build();
    let a = call(&mock, request(body(16, true))).await;
    let b = call(&mock, request(body(16, true))).await;
    assert_eq!((a.status(), b.status()), (StatusCode::OK, StatusCode::OK));
    assert_eq!(mock.stats().in_flight, 2);
    let (status, _, bytes) = read(call(&mock, request(body(16, true))).await).await;
    assert_eq!(status.as_u16(), 529);
    assert_eq!(error_of(status, &bytes).kind(), ApiErrorKind::Overloaded);

    // Dropping a body frees its slot; reading one to the end frees the other.
    drop(a);
    assert_eq!(mock.stats().in_flight, 1);
    let c = call(&mock, request(body(16, true))).await;
    assert_eq!(c.status(), StatusCode::OK);
    read(b).await;
    read(c).await;
    let stats = mock.stats();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.max_in_flight, 2);
    // The dropped stream had sent nothing: only two answers of 16 tokens were delivered.
    assert_eq!(stats.output_tokens[&group_name()], 32);

    // JSON requests are in flight during their latency.
    let futures: Vec<_> = (0..3)
        .map(|_| tokio::spawn(call_owned(mock.clone(), request(body(16, false)))))
        .collect();
    let mut statuses = Vec::new();
    for f in futures {
        statuses.push(f.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 529]);
}

async fn call_owned(mock: MockClaude, req: Request<RequestBody>) -> u16 {
    let res = mock.oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    read(res).await;
    status
}

#[tokio::test(start_paused = true)]
async fn counters_add_up() {
    let mock = MockClaude::builder().output_tokens(10).build();
    let b = body(16, false);
    let est = input_estimate(&b);
    let mut svc = mock.clone();
    for _ in 0..3 {
        let res = ServiceExt::<Request<RequestBody>>::ready(&mut svc)
            .await
            .unwrap()
            .call(request(b.clone()))
            .await
            .unwrap();
        read(res).await;
    }
    read(call(&mock, request_to("/nope", KEY, "")).await).await;
    mock.push_fault(Fault::Overloaded);
    read(call(&mock, request(b.clone())).await).await;
    let stats = mock.stats();
    assert_eq!(stats.received, 5);
    assert_eq!(stats.accepted, 3);
    assert_eq!(
        stats.by_status.into_iter().collect::<Vec<_>>(),
        [(200, 3), (404, 1), (529, 1)]
    );
    assert_eq!(stats.input_tokens[&group_name()], 3 * est);
    assert_eq!(stats.output_tokens[&group_name()], 30);
    assert_eq!(stats.max_in_flight, 1);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.rate_limited, 0);
}

mod loopback {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    fn client() -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn http_request(addr: std::net::SocketAddr, body: String) -> Request<Full<Bytes>> {
        Request::post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_client_talks_to_the_served_simulator() {
        let mock = MockClaude::builder()
            .latency(Duration::from_millis(100), Duration::from_millis(20))
            .output_tokens(30)
            .build();
        let (addr, server) = mock.serve_on_loopback().await.unwrap();
        let client = client();

        // JSON.
        let b = body(256, false);
        let res = client.request(http_request(addr, b.clone())).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers()
                .contains_key("anthropic-ratelimit-requests-remaining")
        );
        assert!(res.headers().contains_key("request-id"));
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let usage = Usage::from_json(&bytes).unwrap();
        assert_eq!(usage.input_tokens, input_estimate(&b));
        assert_eq!(usage.output_tokens, 30);

        // Stream: events arrive as they are produced, not buffered to the end.
        let start = Instant::now();
        let res = client
            .request(http_request(addr, body(256, true)))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        let mut stream = res.into_body();
        let mut tracker = StreamTracker::new();
        let mut first_at = None;
        while let Some(frame) = stream.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                first_at.get_or_insert(start.elapsed());
                tracker.feed(&data);
            }
        }
        let end = start.elapsed();
        assert!(tracker.is_complete());
        assert_eq!(tracker.usage().output_tokens, 30);
        let first_at = first_at.unwrap();
        assert!(
            first_at < Duration::from_millis(200),
            "first event at {first_at:?}"
        );
        assert!(end >= Duration::from_millis(700), "stream ended at {end:?}");

        // Errors travel too.
        let bad = Request::post(format!("http://{addr}/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body(16, false).into_bytes())))
            .unwrap();
        let res = client.request(bad).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

        let stats = mock.stats();
        assert_eq!(stats.received, 3);
        assert_eq!(stats.accepted, 2);
        server.abort();
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the traffic, waiting the announced `retry-after` is always enough, and the
        /// simulator never admits more than a token bucket allows: `limit + limit * t / 60`.
        #[test]
        fn retry_after_is_truthful_and_buckets_bound_admissions(
            steps in proptest::collection::vec((0u64..4_000, 1u64..2_500, any::<bool>()), 1..40)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let limits = MockLimits::new(5, 1_000_000, 3_000);
                let mock = MockClaude::builder().limits(MODEL, limits).output_tokens(50).build();
                let start = Instant::now();
                for (advance_ms, max_tokens, stream) in steps {
                    tokio::time::advance(Duration::from_millis(advance_ms)).await;
                    let (status, headers, _) =
                        read(call(&mock, request(body(max_tokens, stream))).await).await;
                    match status.as_u16() {
                        200 => {}
                        429 => {
                            let secs: u64 = header(&headers, "retry-after").parse().unwrap();
                            assert!(secs >= 1);
                            tokio::time::advance(Duration::from_secs(secs)).await;
                            let (again, _, _) =
                                read(call(&mock, request(body(max_tokens, stream))).await).await;
                            assert_eq!(again, StatusCode::OK, "retry-after {secs} s was not enough");
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                let minutes = start.elapsed().as_secs_f64() / 60.0;
                let stats = mock.stats();
                assert!(stats.accepted as f64 <= 5.0 * (1.0 + minutes) + 1e-6, "{stats:?}");
                let delivered = stats.output_tokens[&group_name()] as f64;
                assert!(delivered <= 3_000.0 * (1.0 + minutes) + 1e-6, "{stats:?}");
                assert_eq!(stats.in_flight, 0);
            });
        }
    }
}

// ---- Acceleration limits (opt-in `MockClaudeBuilder::acceleration_limit`) ----

fn accel_mock(accel: Option<tower_claude::testing::AccelerationLimit>) -> MockClaude {
    let builder = MockClaude::builder().limits(MODEL, MockLimits::new(60, 10_000_000, 1_000_000));
    match accel {
        Some(accel) => builder.acceleration_limit(accel).build(),
        None => builder.build(),
    }
}

/// Sends `n` requests at the current instant; returns the statuses and the headers of the
/// first refusal.
async fn burst(mock: &MockClaude, n: usize) -> (Vec<StatusCode>, Option<HeaderMap>) {
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..n {
        let (status, headers, bytes) = read(call(mock, request(body(16, false))).await).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(error_of(status, &bytes).kind(), ApiErrorKind::RateLimit);
            refused.get_or_insert(headers);
        }
        statuses.push(status);
    }
    (statuses, refused)
}

#[tokio::test(start_paused = true)]
async fn acceleration_limit_refuses_a_burst_from_idle_beyond_the_ramp() {
    use tower_claude::testing::AccelerationLimit;
    // From idle the ceiling is max(floor 6, 0 + growth 10) = 10 requests in the first minute,
    // far below the 60 RPM bucket.
    let mock = accel_mock(Some(AccelerationLimit::new(10, 6)));
    let (statuses, refused) = burst(&mock, 30).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 10, "{statuses:?}");
    assert!(statuses[..10].iter().all(|s| *s == StatusCode::OK));
    let headers = refused.expect("the burst was refused beyond the ramp");
    // Truthful: the ten admissions leave the recent window in exactly 60 s.
    assert_eq!(header(&headers, "retry-after"), "60");
    // The per-minute buckets still hold quota, and the headers say so, as for other 429s.
    assert_eq!(header(&headers, "anthropic-ratelimit-requests-limit"), "60");
    assert_eq!(
        header(&headers, "anthropic-ratelimit-requests-remaining"),
        "50"
    );
    assert!(headers.contains_key("request-id"));
    let stats = mock.stats();
    assert_eq!((stats.accepted, stats.rate_limited), (10, 20));
    assert_eq!(stats.acceleration_limited, 20);
    assert_eq!(stats.by_status[&429], 20);

    // One second short of the retry-after: still refused.
    tokio::time::advance(Duration::from_secs(59)).await;
    let (statuses, _) = burst(&mock, 1).await;
    assert_eq!(statuses, [StatusCode::TOO_MANY_REQUESTS]);
    // After it, the ceiling has grown by the growth: 10 used + 10 = 20 in the next minute.
    tokio::time::advance(Duration::from_secs(1)).await;
    let (statuses, refused) = burst(&mock, 30).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 20, "{statuses:?}");
    assert_eq!(header(&refused.unwrap(), "retry-after"), "60");

    // After a quiet spell of two windows the ceiling is back at the start.
    tokio::time::advance(Duration::from_secs(180)).await;
    let (statuses, _) = burst(&mock, 30).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 10, "{statuses:?}");
}

#[tokio::test(start_paused = true)]
async fn acceleration_limit_accepts_a_gradual_ramp() {
    use tower_claude::testing::AccelerationLimit;
    let mock = accel_mock(Some(AccelerationLimit::new(10, 6)));
    // From 6 to 56 requests per minute in steps of 5 per minute (half the allowed growth),
    // evenly spaced: every request is admitted.
    let mut sent = 0u64;
    for minute in 0..11u32 {
        let rpm = 6 + 5 * minute;
        let gap = Duration::from_secs(60) / rpm;
        for _ in 0..rpm {
            let (status, headers, _) = read(call(&mock, request(body(16, false))).await).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "minute {minute}, retry-after {:?}",
                headers.get("retry-after")
            );
            sent += 1;
            tokio::time::advance(gap).await;
        }
    }
    let stats = mock.stats();
    assert_eq!(stats.accepted, sent);
    assert_eq!((stats.rate_limited, stats.acceleration_limited), (0, 0));
    // The same rates as one jump from idle to 56 RPM are refused in part.
    let jump = accel_mock(Some(AccelerationLimit::new(10, 6)));
    let gap = Duration::from_secs(60) / 56;
    for _ in 0..56 {
        let _ = read(call(&jump, request(body(16, false))).await).await;
        tokio::time::advance(gap).await;
    }
    let stats = jump.stats();
    assert_eq!(stats.accepted, 10, "{stats:?}");
    assert_eq!(stats.acceleration_limited, 46);
}

#[tokio::test(start_paused = true)]
async fn acceleration_retry_after_is_enough() {
    use tower_claude::testing::AccelerationLimit;
    // A 10 s window: growth 6 RPM per minute is one request more per window, from one.
    let accel = AccelerationLimit::new(6, 6).with_window(Duration::from_secs(10));
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(60, 10_000_000, 1_000_000))
        .acceleration_limit(accel)
        .build();
    let start = Instant::now();
    let mut admitted = 0u64;
    // Keep asking, always waiting the announced retry-after: never refused twice in a row.
    while admitted < 40 {
        let (status, headers, _) = read(call(&mock, request(body(16, false))).await).await;
        if status == StatusCode::OK {
            admitted += 1;
            continue;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let secs: u64 = header(&headers, "retry-after").parse().unwrap();
        assert!((1..=20).contains(&secs), "{secs}");
        tokio::time::advance(Duration::from_secs(secs)).await;
        let (again, _, _) = read(call(&mock, request(body(16, false))).await).await;
        assert_eq!(again, StatusCode::OK, "retry-after {secs} s was not enough");
        admitted += 1;
    }
    let stats = mock.stats();
    // Consecutive 10 s windows hold at most 1, 2, 3, ... requests: 40 need 9 windows, while
    // the 60-request bucket alone would have let them all through at once.
    assert!(
        start.elapsed() >= Duration::from_secs(80),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(stats.accepted, 40);
    assert_eq!(stats.acceleration_limited, stats.rate_limited);
    assert!(stats.acceleration_limited >= 8, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn acceleration_limit_steps_aside_at_the_rpm_limit() {
    use tower_claude::testing::AccelerationLimit;
    // 10 s windows, floor and growth 6 RPM, against 12 RPM: after one window at 6 RPM the
    // allowance reaches the limit, then only the bucket (12 requests, one back every 5 s)
    // applies.
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(12, 10_000_000, 1_000_000))
        .acceleration_limit(AccelerationLimit::new(6, 6).with_window(Duration::from_secs(10)))
        .build();
    let (statuses, refused) = burst(&mock, 3).await;
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 1);
    assert_eq!(header(&refused.unwrap(), "retry-after"), "10");
    tokio::time::advance(Duration::from_secs(10)).await;
    // 6 RPM used + 6 = 12 RPM: the ceiling steps aside; the bucket holds 12 (11 left + 2 refilled, capped).
    let (statuses, refused) = burst(&mock, 20).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        12
    );
    let headers = refused.unwrap();
    assert_eq!(header(&headers, "retry-after"), "5");
    assert_eq!(
        header(&headers, "anthropic-ratelimit-requests-remaining"),
        "0"
    );
    let stats = mock.stats();
    assert_eq!((stats.rate_limited, stats.acceleration_limited), (10, 2));
}

#[tokio::test(start_paused = true)]
async fn without_acceleration_limit_a_burst_is_only_bucket_limited() {
    let mock = accel_mock(None);
    let (statuses, refused) = burst(&mock, 70).await;
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 60);
    assert_eq!(header(&refused.unwrap(), "retry-after"), "1");
    let stats = mock.stats();
    assert_eq!((stats.rate_limited, stats.acceleration_limited), (10, 0));
}

/// A body whose system prompt (about 2,000 estimated tokens) is marked for caching.
fn cached_body(stream: bool, ttl: &str, question: &str) -> String {
    let system = "Follow the house style guide. ".repeat(200);
    format!(
        r#"{{"model":"{MODEL}","max_tokens":50,"stream":{stream},"system":[{{"type":"text","text":"{system}","cache_control":{{"type":"ephemeral"{ttl}}}}}],"messages":[{{"role":"user","content":"{question}"}}]}}"#
    )
}

#[tokio::test(start_paused = true)]
async fn prompt_caching_reports_writes_then_reads_in_json_and_sse() {
    let mock = MockClaude::builder()
        .limits(MODEL, MockLimits::new(100, 10_000, 10_000))
        .latency(Duration::ZERO, Duration::ZERO)
        .output_tokens(5)
        .build();
    let first = cached_body(false, "", "one");
    let meta = RequestMeta::scan(first.as_bytes()).unwrap();
    let prefix = meta.cache_breakpoints[0].tokens;
    let (status, headers, bytes) = read(call(&mock, request(first.clone())).await).await;
    assert_eq!(status, StatusCode::OK);
    let usage = Usage::from_json(&bytes).unwrap();
    assert_eq!(usage.cache_creation_input_tokens, prefix);
    assert_eq!(usage.cache_read_input_tokens, 0);
    assert_eq!(usage.input_tokens, meta.input_tokens - prefix);
    // The write counted toward the input limit (10,000 minus the whole estimate, rounded).
    let snap = RateLimitSnapshot::from_headers(&headers);
    assert_eq!(
        snap.input_tokens.remaining,
        Some((10_000 - meta.input_tokens) / 1000 * 1000)
    );

    // A streamed request with the same prefix reads it: message_start carries the usage.
    let second = cached_body(true, "", "two");
    let (_, headers, bytes) = read(call(&mock, request(second.clone())).await).await;
    let mut tracker = StreamTracker::new();
    tracker.feed(&bytes);
    tracker.finish();
    let usage = tracker.usage();
    assert_eq!(usage.cache_read_input_tokens, prefix);
    assert_eq!(usage.cache_creation_input_tokens, 0);
    // Reads do not count toward the limit: only the uncached tail was taken.
    let tail = input_estimate(&second) - prefix;
    let left = RateLimitSnapshot::from_headers(&headers)
        .input_tokens
        .remaining;
    assert_eq!(
        left,
        Some((10_000 - meta.input_tokens - tail) / 1000 * 1000)
    );
    let stats = mock.stats();
    let g = group_name();
    assert_eq!(stats.cache_write_tokens[&g], prefix);
    assert_eq!(stats.cache_read_tokens[&g], prefix);
    assert_eq!(stats.input_tokens[&g], meta.input_tokens + tail);

    // Past the 5-minute TTL the prefix is written again; with "ttl":"1h" it survives.
    tokio::time::advance(Duration::from_secs(301)).await;
    let (_, _, bytes) = read(call(&mock, request(first)).await).await;
    assert_eq!(
        Usage::from_json(&bytes)
            .unwrap()
            .cache_creation_input_tokens,
        prefix
    );
    let hour = cached_body(false, r#","ttl":"1h""#, "three");
    read(call(&mock, request(hour.clone())).await).await;
    tokio::time::advance(Duration::from_secs(1_800)).await;
    let hour_prefix = RequestMeta::scan(hour.as_bytes())
        .unwrap()
        .cache_breakpoints[0]
        .tokens;
    let (_, _, bytes) = read(call(&mock, request(hour)).await).await;
    assert_eq!(
        Usage::from_json(&bytes).unwrap().cache_read_input_tokens,
        hour_prefix
    );
}

#[tokio::test(start_paused = true)]
async fn cache_reads_count_toward_the_limit_for_flagged_models() {
    let model = "claude-3-5-haiku-20241022";
    let mock = MockClaude::builder()
        .limits(model, MockLimits::new(100, 50_000, 10_000))
        .output_tokens(5)
        .build();
    let body = cached_body(false, "", "q").replace(MODEL, model);
    let estimate = input_estimate(&body);
    read(call(&mock, request(body.clone())).await).await;
    let (_, _, bytes) = read(call(&mock, request(body)).await).await;
    assert!(Usage::from_json(&bytes).unwrap().cache_read_input_tokens > 0);
    let g = ModelCatalog::default().group(model).as_str().to_owned();
    assert_eq!(mock.stats().input_tokens[&g], 2 * estimate);
}

#[tokio::test(start_paused = true)]
async fn spend_caps_in_other_shapes() {
    let mock = MockClaude::builder().build();
    mock.push_fault(Fault::SpendCapMessage);
    mock.push_fault(Fault::UsageLimitReached);
    for expected in [StatusCode::TOO_MANY_REQUESTS, StatusCode::BAD_REQUEST] {
        let (status, headers, bytes) = read(call(&mock, request(body(10, false))).await).await;
        assert_eq!(status, expected);
        assert!(headers.get("retry-after").is_none());
        let err = error_of(status, &bytes);
        assert_eq!(err.kind(), ApiErrorKind::SpendLimit, "{err}");
        assert_eq!(err.error_code(), None);
    }
}
