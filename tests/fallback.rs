//! FallbackLayer: the choice before sending (thresholds, cost fit), failover on long 429s,
//! spend caps and 529 storms, bounds, per-request opt-out, streams, and a simulated batch in
//! which the Opus quota runs out mid-way.
#![cfg(feature = "testing")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{ApiError, ApiErrorKind, KeyId, RateLimitGroup, RequestMeta};
use tower_claude::body::RequestBody;
use tower_claude::fallback::{
    FallbackError, FallbackErrorKind, FallbackLayer, NoFallback, ServedModel,
};
use tower_claude::quota::{Cost, Limits, QuotaBoard};
use tower_claude::rate_limit::RateLimitLayer;
use tower_claude::retry::{RetryError, RetryErrorKind, RetryLayer};
use tower_claude::testing::{Fault, MockClaude, MockLimits};

const API_KEY: &str = "sk-ant-fallback-test";
const OPUS: &str = "claude-opus-4-7";
const SONNET: &str = "claude-sonnet-4-6";
const HAIKU: &str = "claude-haiku-4-5";

fn key() -> KeyId {
    KeyId::from_api_key(API_KEY)
}

fn group(name: &str) -> RateLimitGroup {
    RateLimitGroup::new(name)
}

fn request(model: &str, max_tokens: u64, stream: bool) -> Request<RequestBody> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"Summarise the plot of Hamlet in one line."}}]}}"#
    );
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body))
        .unwrap()
}

/// Takes `requests` request units from `(key, group)` and keeps them spent.
fn spend(board: &QuotaBoard, group_name: &str, cost: Cost) {
    board
        .try_acquire(&key(), &group(group_name), cost)
        .unwrap()
        .settle(cost);
}

/// A board with 100 requests / minute for each chain group (tokens generous), so that the
/// binding fraction is `remaining requests / 100`.
fn board_100_rpm() -> QuotaBoard {
    let limits = Limits::new(100, 1_000_000, 1_000_000);
    QuotaBoard::builder()
        .limits(group("claude-opus-4"), limits)
        .limits(group("claude-sonnet-4"), limits)
        .limits(group("claude-haiku-4-5"), limits)
        .build()
}

async fn collect<S, B>(svc: &mut S, req: Request<RequestBody>) -> Result<Response<Bytes>, BoxError>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let res = svc.ready().await?.call(req).await?;
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
    Ok(Response::from_parts(parts, bytes))
}

async fn send<S, B>(
    svc: &mut S,
    req: Request<RequestBody>,
) -> Result<(Response<Bytes>, ServedModel), BoxError>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let res = collect(svc, req).await?;
    let served = res
        .extensions()
        .get::<ServedModel>()
        .cloned()
        .ok_or("no ServedModel extension")?;
    assert_eq!(res.headers()["x-tower-claude-model"], &*served.served);
    Ok((res, served))
}

fn model_in_body(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["model"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn choice_follows_the_thresholds() {
    // (Opus requests spent, Sonnet spent, Haiku spent) -> expected model.
    let cases = [
        ((0, 0, 0), OPUS),
        ((29, 0, 0), OPUS),    // 71 %
        ((30, 0, 0), OPUS),    // exactly 70 %: still at least the threshold
        ((31, 0, 0), SONNET),  // 69 %
        ((31, 70, 0), SONNET), // Sonnet exactly 30 %
        ((31, 71, 0), HAIKU),  // Sonnet 29 %
        ((95, 95, 99), HAIKU), // Haiku 1 %: qualifies (threshold 0, the request fits)
        ((95, 95, 100), OPUS), // nothing fits: most headroom (Opus 5 %, before Sonnet 5 %)
    ];
    for ((o, s, h), expected) in cases {
        let board = board_100_rpm();
        if o > 0 {
            spend(&board, "claude-opus-4", Cost::new(o, 0, 0));
        }
        if s > 0 {
            spend(&board, "claude-sonnet-4", Cost::new(s, 0, 0));
        }
        if h > 0 {
            spend(&board, "claude-haiku-4-5", Cost::new(h, 0, 0));
        }
        let mock = MockClaude::builder().build();
        let mut svc = ServiceBuilder::new()
            .layer(FallbackLayer::new().board(board))
            .service(mock.clone());
        let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
        assert_eq!(&*served.served, expected, "case {:?}", (o, s, h));
        assert_eq!(model_in_body(res.body()), expected);
        assert_eq!(
            (&*served.requested, served.attempts, served.failovers),
            (OPUS, 1, 0)
        );
        assert_eq!(mock.stats().received, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn configured_thresholds_and_requests_below_opus() {
    let board = board_100_rpm();
    spend(&board, "claude-opus-4", Cost::new(45, 0, 0)); // 55 %
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new()
                .board(board.clone())
                .thresholds(0.5, 0.3),
        )
        .service(mock.clone());
    assert_eq!(
        send(&mut svc, request(OPUS, 64, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        OPUS
    );
    let mut strict = ServiceBuilder::new()
        .layer(
            FallbackLayer::new()
                .board(board.clone())
                .position_thresholds([0.9, 0.99]),
        )
        .service(mock.clone());
    // Opus 55 % < 90 %, Sonnet 100 % >= 99 %.
    assert_eq!(
        send(&mut strict, request(OPUS, 64, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        SONNET
    );

    // A Sonnet request never goes up to Opus, even when Sonnet is low and Opus full.
    spend(&board, "claude-sonnet-4", Cost::new(80, 0, 0)); // 20 %
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board.clone()))
        .service(mock.clone());
    assert_eq!(
        send(&mut svc, request(SONNET, 64, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        HAIKU
    );
    // A floor at Sonnet keeps it on Sonnet (most headroom among the allowed models).
    let mut floored = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board.clone()).floor(SONNET))
        .service(mock.clone());
    assert_eq!(
        send(&mut floored, request(SONNET, 64, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        SONNET
    );
    let (_, s) = send(&mut floored, request(OPUS, 64, false)).await.unwrap();
    // Opus 55 % < 70 %, Sonnet 20 % < 30 %, Haiku not allowed: the most headroom is Opus.
    assert_eq!(&*s.served, OPUS);
}

#[tokio::test(start_paused = true)]
async fn skips_a_model_when_the_cost_does_not_fit() {
    // Opus: 10 000 output tokens per minute, 8 000 left (80 %, above the threshold).
    let board = QuotaBoard::builder()
        .limits(group("claude-opus-4"), Limits::new(100, 1_000_000, 10_000))
        .build();
    spend(&board, "claude-opus-4", Cost::new(0, 0, 2_000));
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board.clone()))
        .service(mock.clone());
    // max_tokens 4 000 fits the 8 000 left.
    assert_eq!(
        send(&mut svc, request(OPUS, 4_000, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        OPUS
    );
    // max_tokens 9 000 does not fit now: Sonnet.
    let (res, served) = send(&mut svc, request(OPUS, 9_000, false)).await.unwrap();
    assert_eq!(&*served.served, SONNET);
    assert_eq!(served.failovers, 0, "chosen before sending, not a failover");
    assert_eq!(model_in_body(res.body()), SONNET);
    assert_eq!(mock.stats().received, 2);
}

#[tokio::test(start_paused = true)]
async fn rewrites_the_body_and_the_request_meta() {
    let board = board_100_rpm();
    spend(&board, "claude-opus-4", Cost::new(50, 0, 0));
    // (model in the body, model in the RequestMeta extension, opt-out header) per attempt.
    type Seen = Vec<(String, Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let log = seen.clone();
    let mock = MockClaude::builder().build();
    let upstream = tower::service_fn(move |req: Request<RequestBody>| {
        let body_model = RequestMeta::scan(req.body().as_ref())
            .unwrap()
            .model
            .unwrap();
        let ext_model = req
            .extensions()
            .get::<RequestMeta>()
            .and_then(|m| m.model.clone());
        let header = req
            .headers()
            .get("x-tower-claude-fallback")
            .map(|v| v.to_str().unwrap().to_owned());
        log.lock().unwrap().push((body_model, ext_model, header));
        mock.clone().oneshot(req)
    });
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board))
        .service(upstream);
    let mut req = request(OPUS, 64, false);
    req.headers_mut()
        .insert("x-tower-claude-fallback", "on".parse().unwrap());
    let (_, served) = send(&mut svc, req).await.unwrap();
    assert_eq!(&*served.served, SONNET);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [(SONNET.to_owned(), Some(SONNET.to_owned()), None)]
    );
}

#[tokio::test(start_paused = true)]
async fn fails_over_on_a_long_429_and_returns_a_short_one() {
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().max_wait_before_failover(Duration::from_secs(10)))
        .service(mock.clone());

    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(30),
    });
    let start = Instant::now();
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (SONNET, 2, 1)
    );
    assert_eq!(model_in_body(res.body()), SONNET);
    assert_eq!(start.elapsed(), Duration::ZERO, "failover is immediate");

    // A 429 that asks for 5 s is returned as it is: status, retry-after, envelope.
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(5),
    });
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "5");
    assert!(res.headers().contains_key("request-id"));
    let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (OPUS, 1, 0)
    );
    assert_eq!(mock.stats().by_status.get(&429), Some(&2));
}

#[tokio::test(start_paused = true)]
async fn fails_over_on_the_spend_cap_and_returns_the_last_answer_when_all_are_capped() {
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(mock.clone());
    mock.push_fault(Fault::SpendCap);
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.failovers), (SONNET, 1));

    // Every model capped: each is tried once, then Haiku's 429 comes back unchanged.
    let capped = MockClaude::builder().spend_cap(true).build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(capped.clone());
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    assert_eq!(
        v["error"]["details"]["error_code"],
        "enforced_spend_limit_reached"
    );
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (HAIKU, 3, 2)
    );
    assert_eq!(capped.stats().received, 3);
}

#[tokio::test(start_paused = true)]
async fn moves_on_after_a_529_storm() {
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().max_overloaded(2))
        .service(mock.clone());
    mock.push_fault(Fault::Overloaded);
    mock.push_fault(Fault::Overloaded);
    let start = Instant::now();
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (SONNET, 3, 1)
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(500),
        "one pause before the re-send"
    );

    // One 529 only: the same model answers the re-send.
    mock.push_fault(Fault::Overloaded);
    let (_, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (OPUS, 2, 0)
    );

    // A storm everywhere: 2 + 2 sends, then Haiku (nothing below it) answers once; its 529 is
    // returned.
    let storm = MockClaude::builder().overloaded_rate(1.0).build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(storm.clone());
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status().as_u16(), 529);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (HAIKU, 5, 2)
    );
    assert_eq!(storm.stats().received, 5);

    // max_overloaded(1): the first 529 moves on.
    let mut eager = ServiceBuilder::new()
        .layer(FallbackLayer::new().max_overloaded(1))
        .service(mock.clone());
    mock.push_fault(Fault::Overloaded);
    let (_, served) = send(&mut eager, request(OPUS, 64, false)).await.unwrap();
    assert_eq!((&*served.served, served.attempts), (SONNET, 2));
}

#[tokio::test(start_paused = true)]
async fn walks_are_bounded() {
    // Depth 2: Opus and Sonnet only, even though Haiku is allowed.
    let capped = MockClaude::builder().spend_cap(true).build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().max_depth(2))
        .service(capped.clone());
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((&*served.served, served.attempts), (SONNET, 2));
    assert_eq!(capped.stats().received, 2);

    // A chain that names a model twice still sends each model once.
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new()
                .chain([OPUS, SONNET, OPUS, HAIKU])
                .max_depth(10),
        )
        .service(capped.clone());
    let (_, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!((&*served.served, served.attempts), (HAIKU, 3));

    // A model outside every chain is only ever sent as itself.
    let (res, served) = send(&mut svc, request("claude-3-haiku-20240307", 64, false))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        (&*served.served, served.attempts),
        ("claude-3-haiku-20240307", 1)
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_per_request_by_header_or_extension() {
    let board = board_100_rpm();
    spend(&board, "claude-opus-4", Cost::new(90, 0, 0)); // 10 %
    let headers: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let log = headers.clone();
    let mock = MockClaude::builder().build();
    let upstream = {
        let mock = mock.clone();
        tower::service_fn(move |req: Request<RequestBody>| {
            log.lock().unwrap().push(req.headers().clone());
            mock.clone().oneshot(req)
        })
    };
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board))
        .service(upstream);

    let mut by_header = request(OPUS, 64, false);
    by_header
        .headers_mut()
        .insert("x-tower-claude-fallback", "off".parse().unwrap());
    let (_, served) = send(&mut svc, by_header).await.unwrap();
    assert_eq!((&*served.served, served.attempts), (OPUS, 1));
    assert!(!headers.lock().unwrap()[0].contains_key("x-tower-claude-fallback"));

    let mut by_extension = request(OPUS, 64, false);
    by_extension.extensions_mut().insert(NoFallback);
    mock.push_fault(Fault::SpendCap);
    let (res, served) = send(&mut svc, by_extension).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "no failover either"
    );
    assert_eq!((&*served.served, served.attempts), (OPUS, 1));

    // Without the opt-out the same request goes to Sonnet.
    let (_, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(&*served.served, SONNET);
    assert_eq!(mock.stats().received, 3);
}

#[tokio::test(start_paused = true)]
async fn streams_fail_over_only_before_the_first_byte() {
    let mock = MockClaude::builder().output_tokens(20).build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(mock.clone());

    // An error status: nothing was forwarded, fail over; the caller gets Sonnet's stream.
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(60),
    });
    let (res, served) = send(&mut svc, request(OPUS, 64, true)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.failovers), (SONNET, 1));
    let text = String::from_utf8(res.body().to_vec()).unwrap();
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(text.contains(&format!(r#""model":"{SONNET}""#)));
    assert!(text.contains("event: message_stop"));

    // A 200 stream that fails mid-way is the caller's: no failover, no replay.
    mock.push_fault(Fault::MidStreamError);
    let before = mock.stats().received;
    let (res, served) = send(&mut svc, request(OPUS, 64, true)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.attempts), (OPUS, 1));
    let text = String::from_utf8(res.body().to_vec()).unwrap();
    assert!(
        text.contains("event: error") && text.contains("overloaded_error"),
        "{text}"
    );
    assert_eq!(mock.stats().received, before + 1);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_are_typed_and_other_paths_pass_through() {
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let failing = tower::service_fn(move |_req: Request<RequestBody>| {
        *counter.lock().unwrap() += 1;
        async {
            Err::<Response<tower_claude::testing::MockBody>, BoxError>("connection refused".into())
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(failing);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(OPUS, 64, false))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<FallbackError>().expect("FallbackError");
    assert_eq!(err.kind(), FallbackErrorKind::Inner);
    assert_eq!(
        (err.requested(), err.model(), err.attempts()),
        (OPUS, OPUS, 1)
    );
    assert_eq!(
        std::error::Error::source(err).unwrap().to_string(),
        "connection refused"
    );
    assert_eq!(*calls.lock().unwrap(), 1);

    // A spend-cap error from a layer below moves the request on; the next model answers.
    let mock = MockClaude::builder().build();
    let upstream = {
        let mock = mock.clone();
        tower::service_fn(move |req: Request<RequestBody>| {
            let model = req
                .extensions()
                .get::<RequestMeta>()
                .and_then(|m| m.model.clone());
            let fut = mock.clone().oneshot(req);
            async move {
                if model.as_deref() == Some(OPUS) {
                    let cap = ApiError::new(ApiErrorKind::SpendLimit, "spend cap");
                    return Err::<_, BoxError>(Box::new(cap));
                }
                fut.await
            }
        })
    };
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(upstream.clone());
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (SONNET, 2, 1)
    );
    // With nothing below, the same error is returned, typed.
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().floor(OPUS))
        .service(upstream);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(OPUS, 64, false))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<FallbackError>().expect("FallbackError");
    let source = std::error::Error::source(err).unwrap();
    assert_eq!(
        source.downcast_ref::<ApiError>().unwrap().kind(),
        ApiErrorKind::SpendLimit
    );

    // count_tokens and unreadable bodies pass through untouched, without a ServedModel.
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(mock.clone());
    let mut req = request(OPUS, 64, false);
    *req.uri_mut() = "https://api.anthropic.com/v1/messages/count_tokens"
        .parse()
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.extensions().get::<ServedModel>().is_none());
    assert!(!res.headers().contains_key("x-tower-claude-model"));
    let bad = Request::post("/v1/messages")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from("{not json"))
        .unwrap();
    let res = svc.ready().await.unwrap().call(bad).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(res.extensions().get::<ServedModel>().is_none());
}

#[tokio::test(start_paused = true)]
async fn stacked_above_the_retry_layer() {
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .layer(RetryLayer::new().max_attempts(3).seed(1))
        .service(mock.clone());

    // The retry layer turns the spend cap into an error: the request moves on.
    mock.push_fault(Fault::SpendCap);
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (SONNET, 2, 1)
    );
    assert_eq!(mock.stats().received, 2);

    // Three 529s: the retry layer gives up on Opus (RetryInfo: exhausted) and the layer moves
    // on at once, without re-sending Opus itself.
    for _ in 0..3 {
        mock.push_fault(Fault::Overloaded);
    }
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (&*served.served, served.attempts, served.failovers),
        (SONNET, 2, 1)
    );
    assert_eq!(mock.stats().received, 2 + 4);

    // A short 429 is the retry layer's business: Opus answers after the wait.
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(2),
    });
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.attempts), (OPUS, 1));

    // A long 429 (longer than max_wait_before_failover): the retry layer below does not sit
    // it out (the fallback layer set MaxServerWait), the request moves on to Sonnet at once.
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(45),
    });
    let received = mock.stats().received;
    let start = Instant::now();
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.failovers), (SONNET, 1));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(mock.stats().received, received + 2);

    // Every model capped: one attempt each, then the typed error with the retry layer's
    // spend-limit error as its source.
    let capped = MockClaude::builder().spend_cap(true).build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .layer(RetryLayer::new().seed(1))
        .service(capped.clone());
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(request(OPUS, 64, false))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<FallbackError>().expect("FallbackError");
    assert_eq!(
        (err.model(), err.attempts(), err.failovers()),
        (HAIKU, 3, 2)
    );
    let source = std::error::Error::source(err).unwrap();
    assert_eq!(
        source.downcast_ref::<RetryError>().unwrap().kind(),
        RetryErrorKind::SpendLimit
    );
    assert_eq!(capped.stats().received, 3);
}

#[tokio::test(start_paused = true)]
async fn a_shared_board_counts_requests_in_flight() {
    // Opus: 10 requests per minute, configured on the board the rate limiter writes.
    let mock = MockClaude::builder()
        .latency(Duration::from_secs(1), Duration::ZERO)
        .build();
    let board = QuotaBoard::builder()
        .limits(
            group("claude-opus-4"),
            Limits::new(10, 1_000_000, 1_000_000),
        )
        .build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board.clone()))
        .layer(RateLimitLayer::new().board(board))
        .service(mock.clone());
    // Five requests sent at once: the limiter's reservations lower Opus to 90, 80, 70, 60 %
    // before any answer, so the fifth goes to Sonnet.
    let mut pending = Vec::new();
    for _ in 0..5 {
        pending.push(svc.ready().await.unwrap().call(request(OPUS, 64, false)));
    }
    let mut served = Vec::new();
    for res in futures_util::future::join_all(pending).await {
        served.push(
            res.unwrap()
                .extensions()
                .get::<ServedModel>()
                .unwrap()
                .served
                .to_string(),
        );
    }
    assert_eq!(served, [OPUS, OPUS, OPUS, OPUS, SONNET]);
    assert_eq!(mock.stats().rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn unknown_quota_counts_as_full() {
    // A shared board without configured limits: a rate limiter below has sent its probe for
    // Opus (limits unknown until it answers), so nothing else "fits now" on Opus. The layer
    // still treats Opus as full rather than scattering requests down the chain.
    let board = QuotaBoard::new();
    let probe = board
        .try_acquire(&key(), &group("claude-opus-4"), Cost::new(1, 10, 64))
        .unwrap();
    assert!(!board.fits_now(&key(), &group("claude-opus-4"), &Cost::new(1, 10, 64)));
    let mock = MockClaude::builder().build();
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board))
        .service(mock);
    assert_eq!(
        send(&mut svc, request(OPUS, 64, false))
            .await
            .unwrap()
            .1
            .served
            .as_ref(),
        OPUS
    );
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn learns_quota_from_response_headers_when_alone() {
    // Opus: 10 requests per minute upstream; the layer's own board learns it from headers.
    let mock = MockClaude::builder()
        .limits(OPUS, MockLimits::new(10, 1_000_000, 1_000_000))
        .build();
    let layer = FallbackLayer::new();
    let board = layer.quota_board().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service(mock.clone());
    let mut served = Vec::new();
    for _ in 0..6 {
        served.push(
            send(&mut svc, request(OPUS, 64, false))
                .await
                .unwrap()
                .1
                .served
                .to_string(),
        );
    }
    // 10 -> 9 -> 8 -> 7 left: 70 % still stays; at 6 left (60 %) Sonnet takes over.
    assert_eq!(served, [OPUS, OPUS, OPUS, OPUS, SONNET, SONNET]);
    let opus = board.headroom(&key(), &group("claude-opus-4")).unwrap();
    assert_eq!(opus.requests.unwrap().limit, 10);
    assert_eq!(mock.stats().rate_limited, 0);
}

/// Results of one simulated batch.
#[derive(Debug)]
struct BatchReport {
    completed: usize,
    /// Tasks abandoned after 100 attempts.
    gave_up: usize,
    served: BTreeMap<String, usize>,
    upstream_429: u64,
    upstream_requests: u64,
    elapsed: Duration,
}

/// Runs `tasks` Opus requests with `workers` concurrent callers through `svc`; a caller that
/// gets a 429 or 529 waits the server's `retry-after` (1 s without one) and sends the task
/// again, like a patient SDK. The served model is read from the answer's `model`.
async fn run_batch<S, B>(svc: S, mock: &MockClaude, tasks: usize, workers: usize) -> BatchReport
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let completed = Arc::new(Mutex::new(0usize));
    let gave_up = Arc::new(Mutex::new(0usize));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (next, served, completed, gave_up, mut svc) = (
            next.clone(),
            served.clone(),
            completed.clone(),
            gave_up.clone(),
            svc.clone(),
        );
        handles.push(tokio::spawn(async move {
            loop {
                {
                    let mut n = next.lock().unwrap();
                    if *n == tasks {
                        return;
                    }
                    *n += 1;
                }
                let mut done = false;
                for _ in 0..100 {
                    let res = collect(&mut svc, request(OPUS, 1_024, false))
                        .await
                        .unwrap();
                    if res.status() == StatusCode::OK {
                        let model = model_in_body(res.body());
                        if let Some(s) = res.extensions().get::<ServedModel>() {
                            assert_eq!(&*s.served, model);
                        }
                        *served.lock().unwrap().entry(model).or_default() += 1;
                        *completed.lock().unwrap() += 1;
                        done = true;
                        break;
                    }
                    assert!(
                        matches!(res.status().as_u16(), 429 | 529),
                        "{}",
                        res.status()
                    );
                    let wait = res
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(1);
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                if !done {
                    *gave_up.lock().unwrap() += 1;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let stats = mock.stats();
    let completed = *completed.lock().unwrap();
    let served = served.lock().unwrap().clone();
    let gave_up = *gave_up.lock().unwrap();
    BatchReport {
        completed,
        gave_up,
        served,
        upstream_429: stats.by_status.get(&429).copied().unwrap_or(0),
        upstream_requests: stats.received,
        elapsed: start.elapsed(),
    }
}

fn batch_mock() -> MockClaude {
    // Tier-1-like limits: Opus runs out of output tokens first.
    MockClaude::builder()
        .limits(OPUS, MockLimits::new(50, 30_000, 8_000))
        .limits(SONNET, MockLimits::new(50, 30_000, 8_000))
        .limits(HAIKU, MockLimits::new(50, 50_000, 10_000))
        .latency(Duration::from_millis(800), Duration::from_millis(5))
        .output_tokens(300)
        .seed(5)
        .build()
}

#[tokio::test(start_paused = true)]
async fn batch_completes_when_the_opus_quota_runs_out() {
    const TASKS: usize = 200;
    const WORKERS: usize = 8;

    // Without fallback: every task waits for Opus.
    let mock = batch_mock();
    let baseline = run_batch(mock.clone(), &mock, TASKS, WORKERS).await;

    let mock = batch_mock();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(mock.clone());
    let report = run_batch(svc, &mock, TASKS, WORKERS).await;

    // A retry layer alone (patient, paced), every task on Opus.
    let mock = batch_mock();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().seed(3))
        .service(mock.clone());
    let retry_only = run_batch(svc, &mock, TASKS, WORKERS).await;

    // The recommended order: fallback outside retry.
    let mock = batch_mock();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .layer(RetryLayer::new().seed(3))
        .service(mock.clone());
    let stacked = run_batch(svc, &mock, TASKS, WORKERS).await;

    // The full order with a shared board: fallback, retry, rate limiter.
    let mock = batch_mock();
    let board = QuotaBoard::new();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new().board(board.clone()))
        .layer(RetryLayer::new().seed(3))
        .layer(RateLimitLayer::new().board(board))
        .service(mock.clone());
    let limited = run_batch(svc, &mock, TASKS, WORKERS).await;

    println!("without fallback:         {baseline:?}");
    println!("with fallback:            {report:?}");
    println!("retry layer only:         {retry_only:?}");
    println!("fallback + retry layer:   {stacked:?}");
    println!("fallback + retry + limit: {limited:?}");
    assert_eq!((limited.completed, limited.gave_up), (TASKS, 0));
    assert!(limited.upstream_429 < report.upstream_429, "{limited:?}");
    assert_eq!((stacked.completed, stacked.gave_up), (TASKS, 0));
    assert!(stacked.served.get(OPUS).copied().unwrap_or(0) > 0);
    assert!(
        stacked.elapsed < retry_only.elapsed,
        "{stacked:?} vs {retry_only:?}"
    );

    assert_eq!((report.completed, report.gave_up), (TASKS, 0));
    assert!(report.upstream_requests < baseline.upstream_requests);
    assert_eq!(report.served.values().sum::<usize>(), TASKS);
    let opus = report.served.get(OPUS).copied().unwrap_or(0);
    assert!(
        opus > 0 && opus < TASKS,
        "Opus served some, not all: {report:?}"
    );
    assert!(report.served.get(SONNET).copied().unwrap_or(0) > 0);
    assert!(
        report.elapsed < baseline.elapsed,
        "{report:?} vs {baseline:?}"
    );
    assert!(
        report.upstream_429 < baseline.upstream_429,
        "{report:?} vs {baseline:?}"
    );
}

/// Behind a key pool, a model is as good as its best key in rotation: one key low on Opus
/// quota keeps Opus when the other has plenty; every key low falls back; a key the pool put
/// last after a 403 does not count; and answers are booked to the key that served them.
#[tokio::test(start_paused = true)]
async fn behind_a_key_pool_the_best_key_decides() {
    use tower_claude::key_pool::{ChosenKey, KeyPoolLayer};
    const KEYS: [&str; 2] = ["sk-ant-pool-one", "sk-ant-pool-two"];
    let ids = KEYS.map(KeyId::from_api_key);
    let board = board_100_rpm();
    let mock = MockClaude::builder().api_keys(KEYS).build();
    let pool = KeyPoolLayer::new(KEYS).unwrap().board(board.clone());
    let handle = pool.handle();
    let mut svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new()
                .board(board.clone())
                .key_pool(handle.clone()),
        )
        .layer(pool)
        .layer(RateLimitLayer::new().board(board.clone()))
        .service(mock.clone());
    let opus = group("claude-opus-4");
    let spend_key = |k: &KeyId, n: u64| {
        let c = Cost::new(n, 0, 0);
        board.try_acquire(k, &opus, c).unwrap().settle(c);
    };
    let served = |res: &Response<Bytes>| {
        res.extensions()
            .get::<ServedModel>()
            .unwrap()
            .served
            .to_string()
    };
    // Key one has 10 % of its Opus requests left, key two all of them: Opus, with key two.
    spend_key(&ids[0], 90);
    let res = collect(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(served(&res), OPUS);
    assert_eq!(res.extensions().get::<ChosenKey>().unwrap().key(), &ids[1]);
    // Both keys low on Opus: the request goes to Sonnet before anything is sent to Opus.
    spend_key(&ids[1], 89);
    let opus_before = mock.stats().received;
    let res = collect(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(served(&res), SONNET);
    assert_eq!(mock.stats().received, opus_before + 1);
    // A 403 puts one key last in the Sonnet group; the other key is low on Sonnet: Sonnet's
    // view is that other key's, so an Opus request goes on to Haiku.
    mock.push_fault(Fault::Status(403));
    let res = collect(&mut svc, request(SONNET, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let refused = res.extensions().get::<ChosenKey>().unwrap().key().clone();
    let other = ids.iter().find(|k| **k != refused).unwrap();
    let c = Cost::new(90, 0, 0);
    board
        .try_acquire(other, &group("claude-sonnet-4"), c)
        .unwrap()
        .settle(c);
    let res = collect(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(served(&res), HAIKU);
    // Nothing was booked under a key that served nothing (the request carried no key).
    assert!(
        board.statuses().iter().all(|s| s.key != KeyId::anonymous()),
        "{:?}",
        board.statuses()
    );
}

/// A 429 whose envelope a layer below already read (`ErrorAnswer`) is classified from that
/// extension, not read again: the extension says spend cap (fail over at once) while the body,
/// a short rate limit, would have been returned as it is.
#[tokio::test(start_paused = true)]
async fn an_error_answer_read_below_is_not_read_again() {
    use tower_claude::exchange::ErrorAnswer;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let inner = tower::service_fn(move |req: Request<RequestBody>| {
        let model = model_in_body(req.body().bytes());
        seen.lock().unwrap().push(model.clone());
        async move {
            let mut res = Response::new(http_body_util::Full::new(Bytes::from_static(
                br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
            )));
            if model == OPUS {
                *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                res.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
                res.extensions_mut().insert(ErrorAnswer::from(ApiError::new(
                    ApiErrorKind::SpendLimit,
                    "cap",
                )));
            } else {
                *res.body_mut() = http_body_util::Full::new(Bytes::from_static(b"{}"));
            }
            Ok::<_, BoxError>(res)
        }
    });
    let mut svc = ServiceBuilder::new()
        .layer(FallbackLayer::new())
        .service(inner);
    let (res, served) = send(&mut svc, request(OPUS, 64, false)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!((&*served.served, served.failovers), (SONNET, 1));
    assert_eq!(*calls.lock().unwrap(), [OPUS, SONNET]);
}
