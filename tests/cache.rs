//! Service-level tests of `CacheLayer` with fake upstreams (`tower::service_fn`).
//! The tests against `MockClaude` are in `cache_mock` below (feature `testing`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::anthropic::StreamTracker;
use tower_claude::body::RequestBody;
use tower_claude::cache::{Cache, CacheLayer, CacheStatus, MemoryStore, Tenant};

// The fake upstream's body error is `io::Error`, not `BoxError`: a future that holds a
// service whose body error is `BoxError` trips rustc's "implementation of `From` is not general
// enough" (rust-lang/rust#102211) when it is passed to `tokio::spawn`.
type UpBody = BoxBody<Bytes, std::io::Error>;

const JSON_ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hello"}],"usage":{"input_tokens":12,"output_tokens":42}}"#;

const SSE_EVENTS: &[&str] = &[
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-haiku-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":42}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

const ERROR_EVENT: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

fn full(body: impl Into<Bytes>) -> UpBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A body made of `items`, each polled separately.
fn chunks(items: Vec<Result<Bytes, &'static str>>) -> UpBody {
    let stream = futures_util::stream::iter(items.into_iter().map(|i| match i {
        Ok(b) => Ok(Frame::data(b)),
        Err(e) => Err(std::io::Error::other(e)),
    }));
    StreamBody::new(stream).boxed()
}

/// SSE events cut at odd places (the middle of an event).
fn sse_chunks(events: &[&str]) -> Vec<Result<Bytes, &'static str>> {
    let all: String = events.concat();
    all.as_bytes()
        .chunks(97)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect()
}

fn json_response(status: StatusCode, body: &str) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", "req_upstream")
        .header("anthropic-ratelimit-requests-remaining", "49")
        .header("set-cookie", "session=secret")
        .body(full(body.to_owned()))
        .unwrap()
}

fn sse_response(body: UpBody) -> Response<UpBody> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("request-id", "req_stream")
        .body(body)
        .unwrap()
}

type Handler = dyn Fn(&Request<RequestBody>, usize) -> Response<UpBody> + Send + Sync;

/// A fake upstream: counts calls, waits `latency`, answers with `handler(request, call index)`.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    latency: Duration,
    handler: Arc<Handler>,
    closed: Arc<AtomicBool>,
}

impl Upstream {
    fn new(
        latency: Duration,
        handler: impl Fn(&Request<RequestBody>, usize) -> Response<UpBody> + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Arc::default(),
            latency,
            handler: Arc::new(handler),
            closed: Arc::default(),
        }
    }

    fn json() -> Self {
        Self::new(Duration::from_millis(100), |_, _| {
            json_response(StatusCode::OK, JSON_ANSWER)
        })
    }

    fn sse() -> Self {
        Self::new(Duration::from_millis(100), |_, _| {
            sse_response(chunks(sse_chunks(SSE_EVENTS)))
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<RequestBody>> for Upstream {
    type Response = Response<UpBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<UpBody>, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A closed upstream is never ready again (a limiter with no capacity).
        if self.closed.load(Ordering::SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let res = (self.handler)(&req, n);
        let latency = self.latency;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(res)
        })
    }
}

// Deterministic (`temperature` 0): cached in the default mode.
const BODY: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"temperature":0,"messages":[{"role":"user","content":"Say hello"}]}"#;
const BODY_REORDERED: &str = r#"{
  "messages": [ { "content": "Say hello", "role": "user" } ],
  "temperature": 0,
  "max_tokens": 64,
  "model": "claude-haiku-4-5"
}"#;
const STREAM_BODY: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"temperature":0,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

fn request(key: &str, body: &str) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body.to_owned()))
        .unwrap()
}

fn cache(upstream: &Upstream) -> Cache<Upstream> {
    CacheLayer::memory(64 << 20).layer_on(upstream.clone())
}

/// `CacheLayer::layer` with the layer first, for readability.
trait LayerOn {
    fn layer_on(self, upstream: Upstream) -> Cache<Upstream>;
}

impl LayerOn for CacheLayer {
    fn layer_on(self, upstream: Upstream) -> Cache<Upstream> {
        ServiceBuilder::new().layer(self).service(upstream)
    }
}

async fn send(
    svc: &Cache<Upstream>,
    req: Request<RequestBody>,
) -> (CacheStatus, StatusCode, http::HeaderMap, Bytes) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let status = *res.extensions().get::<CacheStatus>().unwrap();
    assert_eq!(res.headers()["x-tower-claude-cache"], status.as_str());
    let code = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, code, headers, body)
}

/// The cache status of a response, without reading its body.
async fn status_only(svc: &Cache<Upstream>, req: Request<RequestBody>) -> CacheStatus {
    let res = svc.clone().oneshot(req).await.unwrap();
    *res.extensions().get::<CacheStatus>().unwrap()
}

#[tokio::test(start_paused = true)]
async fn json_miss_then_hit_with_reordered_keys_and_filtered_headers() {
    let up = Upstream::json();
    let svc = cache(&up);
    let (s, code, headers, body) = send(&svc, request("sk-a", BODY)).await;
    assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
    assert_eq!(&body[..], JSON_ANSWER.as_bytes());
    // The caller of a miss sees every upstream header.
    assert!(headers.contains_key("anthropic-ratelimit-requests-remaining"));

    let (s, code, headers, body) = send(&svc, request("sk-a", BODY_REORDERED)).await;
    assert_eq!((s, code), (CacheStatus::Hit, StatusCode::OK));
    assert_eq!(&body[..], JSON_ANSWER.as_bytes());
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["request-id"], "req_upstream");
    assert!(!headers.contains_key("set-cookie"));
    assert!(!headers.contains_key("anthropic-ratelimit-requests-remaining"));
    assert_eq!(up.calls(), 1);

    // Changed content: a miss.
    let changed = BODY.replace("Say hello", "Say hello!");
    assert_eq!(
        send(&svc, request("sk-a", &changed)).await.0,
        CacheStatus::Miss
    );
    // Changed anthropic-version or beta: a miss.
    let mut req = request("sk-a", BODY);
    req.headers_mut()
        .insert("anthropic-beta", "some-beta-2025".parse().unwrap());
    assert_eq!(send(&svc, req).await.0, CacheStatus::Miss);
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn tenants_never_share_entries() {
    let up = Upstream::new(Duration::from_millis(10), |req, _| {
        // Echo the key so that a cross-tenant hit would be visible.
        let key = req
            .headers()
            .get("x-api-key")
            .map_or("none", |v| v.to_str().unwrap())
            .to_owned();
        json_response(
            StatusCode::OK,
            &format!(r#"{{"type":"message","answer_for":"{key}"}}"#),
        )
    });
    let svc = cache(&up);
    let (_, _, _, a) = send(&svc, request("sk-a", BODY)).await;
    let (s, _, _, b) = send(&svc, request("sk-b", BODY)).await;
    assert_eq!(s, CacheStatus::Miss);
    assert_ne!(a, b);
    let (s, _, _, a2) = send(&svc, request("sk-a", BODY)).await;
    assert_eq!((s, a2), (CacheStatus::Hit, a));
    // No key at all: its own (anonymous) partition.
    let mut anon = request("x", BODY);
    anon.headers_mut().remove("x-api-key");
    assert_eq!(send(&svc, anon).await.0, CacheStatus::Miss);
    assert_eq!(up.calls(), 3);

    // A Tenant extension wins over the key: two keys of one tenant share entries...
    let mut t1 = request("sk-c", BODY);
    t1.extensions_mut().insert(Tenant::new("acme"));
    let mut t2 = request("sk-d", BODY);
    t2.extensions_mut().insert(Tenant::new("acme"));
    assert_eq!(send(&svc, t1).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, t2).await.0, CacheStatus::Hit);
    // ...and another tenant with the same key does not.
    let mut t3 = request("sk-c", BODY);
    t3.extensions_mut().insert(Tenant::new("globex"));
    assert_eq!(send(&svc, t3).await.0, CacheStatus::Miss);
    assert_eq!(up.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_layer_tenant_shares_entries_between_keys_and_secrets_partition() {
    let up = Upstream::json();
    let store = Arc::new(MemoryStore::new(1 << 20));
    let svc = CacheLayer::with_shared_store(store.clone())
        .tenant("org")
        .layer_on(up.clone());
    assert_eq!(send(&svc, request("sk-a", BODY)).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, request("sk-b", BODY)).await.0, CacheStatus::Hit);
    // Same store, another tenant secret: nothing is reachable.
    let other = CacheLayer::with_shared_store(store)
        .tenant("org")
        .secret(tower_claude::cache::CacheSecret::from_bytes([9; 32]))
        .layer_on(up.clone());
    assert_eq!(
        send(&other, request("sk-a", BODY)).await.0,
        CacheStatus::Miss
    );
}

#[tokio::test(start_paused = true)]
async fn entries_expire_after_the_ttl() {
    let up = Upstream::json();
    let svc = CacheLayer::memory(1 << 20)
        .ttl(Duration::from_secs(600))
        .layer_on(up.clone());
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    tokio::time::advance(Duration::from_secs(500)).await;
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
    tokio::time::advance(Duration::from_secs(100)).await;
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn default_ttl_is_four_hours() {
    let up = Upstream::json();
    let svc = cache(&up);
    send(&svc, request("sk", BODY)).await;
    tokio::time::advance(Duration::from_secs(4 * 3600 - 1)).await;
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
}

fn track(bytes: &[u8]) -> StreamTracker {
    let mut t = StreamTracker::new();
    t.feed(bytes);
    t.finish();
    t
}

#[tokio::test(start_paused = true)]
async fn stream_is_stored_after_message_stop_and_replayed() {
    let up = Upstream::sse();
    let svc = cache(&up);
    let (s, _, headers, streamed) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(s, CacheStatus::Miss);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(&streamed[..], SSE_EVENTS.concat().as_bytes());

    let (s, code, headers, replayed) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!((s, code), (CacheStatus::Hit, StatusCode::OK));
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(replayed, streamed);
    let (original, replay) = (track(&streamed), track(&replayed));
    assert!(replay.is_complete());
    assert!(replay.error().is_none());
    assert_eq!(replay.usage(), original.usage());
    assert_eq!(replay.usage().output_tokens, 42);
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn streaming_and_json_requests_never_share_an_entry() {
    let up = Upstream::new(Duration::from_millis(10), |req, _| {
        if String::from_utf8_lossy(req.body().bytes()).contains("\"stream\":true") {
            sse_response(chunks(sse_chunks(SSE_EVENTS)))
        } else {
            json_response(StatusCode::OK, JSON_ANSWER)
        }
    });
    let svc = cache(&up);
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    let (s, _, headers, body) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(s, CacheStatus::Miss);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert!(track(&body).is_complete());
    let (s, _, headers, _) = send(&svc, request("sk", BODY)).await;
    assert_eq!(
        (s, &headers["content-type"]),
        (
            CacheStatus::Hit,
            &"application/json".parse::<http::HeaderValue>().unwrap()
        )
    );
    let (s, _, headers, _) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(
        (s, &headers["content-type"]),
        (
            CacheStatus::Hit,
            &"text/event-stream".parse::<http::HeaderValue>().unwrap()
        )
    );
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stream_chunks_are_forwarded_as_they_arrive() {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let up = Upstream::new(Duration::ZERO, move |_, _| {
        let rx = rx.lock().unwrap().take().expect("one call");
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        });
        sse_response(StreamBody::new(stream).boxed())
    });
    let svc = cache(&up);
    let res = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    let mut body = res.into_body();
    for event in SSE_EVENTS {
        tx.send(Bytes::from_static(event.as_bytes())).unwrap();
        // Each chunk reaches the caller before the next one exists.
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), event.as_bytes());
    }
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(
        send(&svc, request("sk", STREAM_BODY)).await.0,
        CacheStatus::Hit
    );
}

async fn assert_not_stored(upstream: Upstream, body: &str) {
    let svc = cache(&upstream);
    let res = svc.clone().oneshot(request("sk", body)).await.unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    // The caller sees what upstream sent, errors included.
    let _ = res.into_body().collect().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(send(&svc, request("sk", body)).await.0, CacheStatus::Miss);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn error_statuses_are_never_cached() {
    for status in [429, 500, 529, 400, 404] {
        let status = StatusCode::from_u16(status).unwrap();
        let up = Upstream::new(Duration::from_millis(10), move |_, _| {
            json_response(
                status,
                r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            )
        });
        assert_not_stored(up, BODY).await;
    }
}

#[tokio::test(start_paused = true)]
async fn partial_and_errored_streams_are_never_cached() {
    // Cut before message_stop.
    let n = SSE_EVENTS.len();
    assert_not_stored(
        Upstream::new(Duration::ZERO, move |_, _| {
            sse_response(chunks(sse_chunks(&SSE_EVENTS[..n - 1])))
        }),
        STREAM_BODY,
    )
    .await;
    // `event: error` after content.
    assert_not_stored(
        Upstream::new(Duration::ZERO, |_, _| {
            let mut events = SSE_EVENTS[..4].to_vec();
            events.push(ERROR_EVENT);
            sse_response(chunks(sse_chunks(&events)))
        }),
        STREAM_BODY,
    )
    .await;
    // A body error (connection reset) mid-stream: the caller gets the error.
    let up = Upstream::new(Duration::ZERO, |_, _| {
        let mut items = sse_chunks(&SSE_EVENTS[..3]);
        items.push(Err("connection reset"));
        sse_response(chunks(items))
    });
    let svc = cache(&up);
    let res = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    assert_eq!(
        status_only(&svc, request("sk", STREAM_BODY)).await,
        CacheStatus::Miss
    );
    // A JSON body error: not stored either.
    let up = Upstream::new(Duration::ZERO, |_, _| {
        let mut res = json_response(StatusCode::OK, "");
        *res.body_mut() = chunks(vec![Ok(Bytes::from_static(b"{\"id\":")), Err("reset")]);
        res
    });
    let svc = cache(&up);
    let res = svc.clone().oneshot(request("sk", BODY)).await.unwrap();
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(
        status_only(&svc, request("sk", BODY)).await,
        CacheStatus::Miss
    );
    assert_eq!(up.calls(), 2);
}

/// The only caller of a stream leaves before its end: the upstream stream is dropped (the
/// request is cancelled upstream) and nothing is stored.
#[tokio::test(start_paused = true)]
async fn a_stream_dropped_early_by_its_only_caller_is_cancelled_and_not_cached() {
    let (up, tx) = fed_sse_upstream();
    let svc = cache(&up);
    let res = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    tx.send(Bytes::from_static(SSE_EVENTS[0].as_bytes()))
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    tokio::time::timeout(Duration::from_secs(1), tx.closed())
        .await
        .expect("the upstream body was dropped");
    assert_eq!(
        send(&svc, request("sk", STREAM_BODY)).await.0,
        CacheStatus::Miss
    );
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn entries_over_the_size_cap_are_forwarded_whole_but_not_stored() {
    let big = format!(r#"{{"type":"message","text":"{}"}}"#, "x".repeat(10_000));
    let answer = big.clone();
    let up = Upstream::new(Duration::ZERO, move |_, _| {
        let mut res = json_response(StatusCode::OK, "");
        // Several frames, so that the cap is crossed in the middle.
        let items = answer
            .as_bytes()
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        *res.body_mut() = chunks(items);
        res
    });
    let svc = CacheLayer::memory(1 << 20)
        .max_entry_bytes(4096)
        .layer_on(up.clone());
    let (s, _, _, body) = send(&svc, request("sk", BODY)).await;
    assert_eq!((s, &body[..]), (CacheStatus::Miss, big.as_bytes()));
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);

    // A stream over the cap: forwarded, not stored.
    let up = Upstream::sse();
    let svc = CacheLayer::memory(1 << 20)
        .max_entry_bytes(300)
        .layer_on(up.clone());
    let (s, _, _, body) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(
        (s, &body[..]),
        (CacheStatus::Miss, SSE_EVENTS.concat().as_bytes())
    );
    assert_eq!(
        send(&svc, request("sk", STREAM_BODY)).await.0,
        CacheStatus::Miss
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let up = Upstream::json();
    let svc = cache(&up);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, request("sk", BODY)).await
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, code, _, body) = t.await.unwrap();
        assert_eq!((code, &body[..]), (StatusCode::OK, JSON_ANSWER.as_bytes()));
        statuses.push(s);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(
        statuses.iter().filter(|s| **s == CacheStatus::Miss).count(),
        1
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == CacheStatus::Hit).count(),
        19
    );
    // Another tenant does not join the flight.
    let other = send(&svc, request("sk-other", BODY)).await;
    assert_eq!(other.0, CacheStatus::Miss);
}

#[tokio::test(start_paused = true)]
async fn a_failed_leader_is_not_shared_and_a_follower_takes_over() {
    // The first call fails with 529; every later call succeeds.
    let up = Upstream::new(Duration::from_millis(100), |_, n| {
        if n == 0 {
            json_response(StatusCode::from_u16(529).unwrap(), r#"{"type":"error"}"#)
        } else {
            json_response(StatusCode::OK, JSON_ANSWER)
        }
    });
    let svc = cache(&up);
    let leader = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, request("sk", BODY)).await })
    };
    tokio::task::yield_now().await;
    let mut followers = Vec::new();
    for _ in 0..5 {
        let svc = svc.clone();
        followers.push(tokio::spawn(async move {
            send(&svc, request("sk", BODY)).await
        }));
    }
    let (s, code, _, _) = leader.await.unwrap();
    assert_eq!((s, code.as_u16()), (CacheStatus::Miss, 529));
    let mut misses = 0;
    for f in followers {
        let (s, code, _, body) = f.await.unwrap();
        assert_eq!((code, &body[..]), (StatusCode::OK, JSON_ANSWER.as_bytes()));
        misses += usize::from(s == CacheStatus::Miss);
    }
    assert_eq!(misses, 1, "one follower led the second call");
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_does_not_hang_its_followers() {
    let up = Upstream::json();
    let svc = cache(&up);
    let leader = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, request("sk", BODY)).await })
    };
    tokio::task::yield_now().await;
    let follower = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, request("sk", BODY)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    leader.abort();
    let (s, code, _, _) = follower.await.unwrap();
    assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
    assert_eq!(up.calls(), 2);
}

/// An upstream whose first streaming answer is fed by the test, chunk by chunk, through the
/// returned sender (`closed()` on the sender tells when the upstream body was dropped); later
/// calls get a complete stream at once.
fn fed_sse_upstream() -> (Upstream, tokio::sync::mpsc::UnboundedSender<Bytes>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let up = Upstream::new(Duration::from_millis(10), move |_, _| {
        let Some(rx) = rx.lock().unwrap().take() else {
            return sse_response(chunks(sse_chunks(SSE_EVENTS)));
        };
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        });
        sse_response(StreamBody::new(stream).boxed())
    });
    (up, tx)
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_streams_share_one_upstream_stream_live() {
    let (up, tx) = fed_sse_upstream();
    let svc = cache(&up);
    // Three identical streaming requests at once, one more after the stream has started.
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(request("sk", STREAM_BODY)).await.unwrap() })
        })
        .collect();
    for c in calls {
        let res = c.await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        statuses.push(*res.extensions().get::<CacheStatus>().unwrap());
        bodies.push(res.into_body());
    }
    // Each reader gets each chunk as soon as upstream sends it.
    for event in &SSE_EVENTS[..3] {
        tx.send(Bytes::from_static(event.as_bytes())).unwrap();
        for body in bodies.iter_mut() {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), event.as_bytes());
        }
    }
    let late = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    statuses.push(*late.extensions().get::<CacheStatus>().unwrap());
    bodies.push(late.into_body());
    for event in &SSE_EVENTS[3..] {
        tx.send(Bytes::from_static(event.as_bytes())).unwrap();
    }
    drop(tx);
    let all: String = SSE_EVENTS.concat();
    let mut seen = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let rest = body.collect().await.unwrap().to_bytes();
        seen.push(rest.len());
        // The late reader got the stream from its first event.
        if i == 3 {
            assert_eq!(rest, all.as_bytes());
            assert!(track(&rest).is_complete());
        }
    }
    assert_eq!(up.calls(), 1, "one upstream stream for four callers");
    assert_eq!(
        statuses.iter().filter(|s| **s == CacheStatus::Miss).count(),
        1
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == CacheStatus::Hit).count(),
        3
    );
    // And the complete stream was stored.
    let (s, _, _, body) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!((s, &body[..]), (CacheStatus::Hit, all.as_bytes()));
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_stream_goes_on_for_followers_when_the_leader_leaves() {
    let (up, tx) = fed_sse_upstream();
    let svc = cache(&up);
    let leader = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(
        leader.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    let follower = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(
        follower.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Hit)
    );
    tx.send(Bytes::from_static(SSE_EVENTS[0].as_bytes()))
        .unwrap();
    let mut leader = leader.into_body();
    leader.frame().await.unwrap().unwrap();
    drop(leader);
    for event in &SSE_EVENTS[1..] {
        tx.send(Bytes::from_static(event.as_bytes())).unwrap();
    }
    drop(tx);
    let body = follower.into_body().collect().await.unwrap().to_bytes();
    assert!(track(&body).is_complete());
    assert_eq!(
        send(&svc, request("sk", STREAM_BODY)).await.0,
        CacheStatus::Hit
    );
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_failed_stream_see_the_same_failure_and_it_is_not_stored() {
    let (up, tx) = fed_sse_upstream();
    let svc = cache(&up);
    let a = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    let b = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    for event in SSE_EVENTS[..4].iter().chain([&ERROR_EVENT]) {
        tx.send(Bytes::from_static(event.as_bytes())).unwrap();
    }
    drop(tx);
    for res in [a, b] {
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(track(&body).error().is_some());
    }
    // Not stored: the next request goes upstream.
    let (s, _, _, body) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(s, CacheStatus::Miss);
    assert!(track(&body).is_complete());
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn cache_control_no_store_and_no_cache() {
    let up = Upstream::json();
    let svc = cache(&up);
    let with = |cc: &str| {
        let mut r = request("sk", BODY);
        r.headers_mut().insert("cache-control", cc.parse().unwrap());
        r
    };
    // no-store: neither written...
    assert_eq!(send(&svc, with("no-store")).await.0, CacheStatus::Bypass);
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    // ...nor read.
    assert_eq!(send(&svc, with("no-store")).await.0, CacheStatus::Bypass);
    // no-cache: not read, but written.
    assert_eq!(
        send(&svc, with("max-stale, No-Cache")).await.0,
        CacheStatus::Miss
    );
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
    assert_eq!(up.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_default_mode_caches_only_deterministic_requests() {
    let up = Upstream::json();
    let svc = CacheLayer::memory(1 << 20).layer_on(up.clone());
    let t0 = BODY;
    let unset = BODY.replace("\"temperature\":0,", "");
    let t07 = BODY.replace("\"temperature\":0", "\"temperature\":0.7");
    // `top_k` / `top_p` do not make a temperature-0 request sample.
    let t0_top = BODY.replace(
        "\"temperature\":0",
        "\"temperature\":0,\"top_k\":5,\"top_p\":0.9",
    );
    assert_eq!(
        send(&svc, request("sk", &unset)).await.0,
        CacheStatus::Bypass
    );
    assert_eq!(
        send(&svc, request("sk", &unset)).await.0,
        CacheStatus::Bypass
    );
    assert_eq!(send(&svc, request("sk", &t07)).await.0, CacheStatus::Bypass);
    assert_eq!(send(&svc, request("sk", t0)).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, request("sk", t0)).await.0, CacheStatus::Hit);
    assert_eq!(
        send(&svc, request("sk", &t0_top)).await.0,
        CacheStatus::Miss
    );
    assert_eq!(send(&svc, request("sk", &t0_top)).await.0, CacheStatus::Hit);
    assert_eq!(up.calls(), 5);
}

/// `x-tower-claude-cache: use | bypass | refresh` on the request, in every mode; the header
/// is not sent upstream.
#[tokio::test(start_paused = true)]
async fn the_request_header_opts_in_and_out() {
    use tower_claude::cache::CacheMode;
    let with = |body: &str, value: &'static str| {
        let mut req = request("sk", body);
        req.headers_mut()
            .insert("x-tower-claude-cache", value.parse().unwrap());
        req
    };
    let sampled = BODY.replace("\"temperature\":0", "\"temperature\":1");
    let saw_header = Arc::new(AtomicBool::new(false));
    let seen = saw_header.clone();
    let up = Upstream::new(Duration::from_millis(100), move |req, _| {
        seen.fetch_or(
            req.headers().contains_key("x-tower-claude-cache"),
            Ordering::SeqCst,
        );
        json_response(StatusCode::OK, JSON_ANSWER)
    });
    // Deterministic mode: `use` opts a sampled request in.
    let svc = CacheLayer::memory(1 << 20).layer_on(up.clone());
    assert_eq!(send(&svc, with(&sampled, "use")).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, with(&sampled, "use")).await.0, CacheStatus::Hit);
    assert_eq!(
        send(&svc, request("sk", &sampled)).await.0,
        CacheStatus::Bypass
    );
    // A sampled request with another directive is not cached either (the directive is
    // still taken out).
    for value in ["bypass", "refresh", "nonsense"] {
        assert_eq!(
            send(&svc, with(&sampled, value)).await.0,
            CacheStatus::Bypass,
            "{value}"
        );
    }
    // `bypass`: neither read nor written; `refresh`: not read, written.
    assert_eq!(
        send(&svc, with(BODY, "bypass")).await.0,
        CacheStatus::Bypass
    );
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, with(BODY, "refresh")).await.0, CacheStatus::Miss);
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
    assert_eq!(
        up.calls(),
        8,
        "use, sampled, the three sampled directives, bypass, miss, refresh"
    );
    // Mode `all`: a sampled request is cached, `bypass` still opts out.
    let all = CacheLayer::memory(1 << 20)
        .mode(CacheMode::All)
        .layer_on(up.clone());
    assert_eq!(
        send(&all, with(&sampled, "bypass")).await.0,
        CacheStatus::Bypass
    );
    assert_eq!(
        send(&all, request("sk", &sampled)).await.0,
        CacheStatus::Miss
    );
    assert_eq!(
        send(&all, request("sk", &sampled)).await.0,
        CacheStatus::Hit
    );
    // Mode `off`: nothing, whatever the request asks.
    let off = CacheLayer::memory(1 << 20)
        .mode(CacheMode::Off)
        .layer_on(up.clone());
    assert_eq!(send(&off, with(BODY, "use")).await.0, CacheStatus::Bypass);
    assert!(
        !saw_header.load(Ordering::SeqCst),
        "the header stays in the proxy"
    );
}

#[tokio::test(start_paused = true)]
async fn other_requests_pass_through() {
    let up = Upstream::json();
    let svc = cache(&up);
    let count = Request::post("https://api.anthropic.com/v1/messages/count_tokens")
        .header("x-api-key", "sk")
        .body(RequestBody::from(BODY))
        .unwrap();
    assert_eq!(send(&svc, count).await.0, CacheStatus::Bypass);
    let get = Request::get("https://api.anthropic.com/v1/models")
        .body(RequestBody::empty())
        .unwrap();
    assert_eq!(send(&svc, get).await.0, CacheStatus::Bypass);
    for bad in ["{not json", "[1,2]", ""] {
        assert_eq!(send(&svc, request("sk", bad)).await.0, CacheStatus::Bypass);
        assert_eq!(send(&svc, request("sk", bad)).await.0, CacheStatus::Bypass);
    }
    assert_eq!(up.calls(), 8);
}

#[tokio::test(start_paused = true)]
async fn hits_do_not_wait_for_the_inner_service() {
    let up = Upstream::json();
    let svc = cache(&up);
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
    // The inner service will never be ready again (a limiter out of capacity).
    up.closed.store(true, Ordering::SeqCst);
    let hit = tokio::time::timeout(Duration::from_secs(1), send(&svc, request("sk", BODY))).await;
    assert_eq!(hit.unwrap().0, CacheStatus::Hit);
    let miss = tokio::time::timeout(
        Duration::from_secs(1),
        send(&svc, request("sk", &BODY.replace("hello", "bye"))),
    )
    .await;
    assert!(miss.is_err(), "a miss waits for the inner service");
}

/// An upstream that answers `Pending` to two `poll_ready`s of five and counts the calls made
/// without a `Ready` since its last call (breaches of `Service`'s contract). A clone has not
/// been polled (as a real service's clone, e.g. `tower::buffer::Buffer`'s).
struct Strict {
    upstream: Upstream,
    polls: Arc<AtomicUsize>,
    ready: bool,
    breaches: Arc<AtomicUsize>,
}

impl Clone for Strict {
    fn clone(&self) -> Self {
        Self {
            upstream: self.upstream.clone(),
            polls: self.polls.clone(),
            ready: false,
            breaches: self.breaches.clone(),
        }
    }
}

impl Service<Request<RequestBody>> for Strict {
    type Response = Response<UpBody>;
    type Error = Infallible;
    type Future = <Upstream as Service<Request<RequestBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) % 5 < 2 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        if !std::mem::take(&mut self.ready) {
            self.breaches.fetch_add(1, Ordering::SeqCst);
        }
        self.upstream.call(req)
    }
}

/// `Cache` polls the inner service's readiness without waiting for it and sends a miss (or a
/// bypass) straight to it only when it said it was ready: misses, hits and bypasses through
/// one `Cache` (not cloned per request), the inner service ready three polls of five, and no
/// call is ever made to it without its `Ready`.
#[tokio::test(start_paused = true)]
async fn the_inner_service_is_called_only_when_ready() {
    let up = Upstream::json();
    let strict = Strict {
        upstream: up.clone(),
        polls: Arc::default(),
        ready: false,
        breaches: Arc::default(),
    };
    let breaches = strict.breaches.clone();
    let mut svc = ServiceBuilder::new()
        .layer(CacheLayer::memory(64 << 20))
        .service(strict);
    let models = || {
        Request::get("https://api.anthropic.com/v1/models")
            .body(RequestBody::empty())
            .unwrap()
    };
    let mut statuses = Vec::new();
    for i in 0..30 {
        let req = match i % 3 {
            0 => request("sk", &BODY.replace("hello", &format!("hello {i}"))),
            1 => request("sk", &BODY.replace("hello", &format!("hello {}", i - 1))),
            _ => models(),
        };
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        statuses.push(*res.extensions().get::<CacheStatus>().unwrap());
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(breaches.load(Ordering::SeqCst), 0, "called without Ready");
    let count = |s| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(
        (
            count(CacheStatus::Miss),
            count(CacheStatus::Hit),
            count(CacheStatus::Bypass)
        ),
        (10, 10, 10)
    );
    assert_eq!(up.calls(), 20);
}

#[cfg(feature = "disk-cache")]
#[tokio::test(start_paused = true)]
async fn disk_entries_survive_a_restart() {
    use tower_claude::cache::DiskStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.redb");
    let up = Upstream::sse();
    {
        let svc = CacheLayer::new(DiskStore::open(&path, 1 << 20).unwrap()).layer_on(up.clone());
        assert_eq!(
            send(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Miss
        );
        assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Miss);
        // Stored after delivery, in the background: wait for it before closing the file.
        svc.flush().await;
    }
    let svc = CacheLayer::new(DiskStore::open(&path, 1 << 20).unwrap()).layer_on(up.clone());
    let (s, _, _, replay) = send(&svc, request("sk", STREAM_BODY)).await;
    assert_eq!(s, CacheStatus::Hit);
    assert_eq!(&replay[..], SSE_EVENTS.concat().as_bytes());
    assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
    // Another key's tenant still misses after the restart.
    assert_eq!(send(&svc, request("sk-2", BODY)).await.0, CacheStatus::Miss);
    assert_eq!(up.calls(), 3);
}

#[cfg(feature = "disk-cache")]
#[tokio::test(start_paused = true)]
async fn disk_store_coalesces_too() {
    use tower_claude::cache::DiskStore;
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::json();
    let svc = CacheLayer::new(DiskStore::open(dir.path().join("c.redb"), 1 << 20).unwrap())
        .layer_on(up.clone());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, request("sk", BODY)).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().1, StatusCode::OK);
    }
    assert_eq!(up.calls(), 1);
}

/// The layer in front of `MockClaude`, alone and stacked, in process and over loopback HTTP.
///
/// These futures are not `tokio::spawn`ed: `MockClaude`'s error type is `BoxError`, which trips
/// rust-lang/rust#102211 in a spawned future; `join_all` runs them concurrently instead.
#[cfg(feature = "testing")]
mod with_mock {
    use super::*;
    use futures_util::future::join_all;
    use tower::Layer;
    use tower::limit::ConcurrencyLimitLayer;
    use tower_claude::testing::{Fault, MockClaude, MockLimits};

    const LIMITS: MockLimits = MockLimits {
        rpm: 1000,
        itpm: 1_000_000,
        otpm: 1_000_000,
    };

    fn mock() -> MockClaude {
        MockClaude::builder()
            .default_limits(LIMITS)
            .latency(Duration::from_millis(200), Duration::from_millis(5))
            .output_tokens(30)
            .build()
    }

    async fn send_to<S, B>(svc: &S, req: Request<RequestBody>) -> (CacheStatus, StatusCode, Bytes)
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Error = BoxError> + Clone,
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let res = svc.clone().oneshot(req).await.unwrap();
        let status = *res.extensions().get::<CacheStatus>().unwrap();
        let code = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, code, body)
    }

    use tower_claude::BoxError;

    #[tokio::test(start_paused = true)]
    async fn stacked_over_a_concurrency_limit_json_and_stream() {
        let mock = mock();
        let svc = ServiceBuilder::new()
            .layer(CacheLayer::memory(1 << 20))
            .layer(ConcurrencyLimitLayer::new(2))
            .service(mock.clone());
        let (s, code, json) = send_to(&svc, request("sk", BODY)).await;
        assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
        let (s, _, again) = send_to(&svc, request("sk", BODY_REORDERED)).await;
        assert_eq!((s, &again), (CacheStatus::Hit, &json));
        assert_eq!(mock.stats().received, 1);

        let (s, _, streamed) = send_to(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!(s, CacheStatus::Miss);
        let start = tokio::time::Instant::now();
        let (s, _, replayed) = send_to(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!(s, CacheStatus::Hit);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a hit does not wait for the model"
        );
        assert_eq!(replayed, streamed);
        let (original, replay) = (track(&streamed), track(&replayed));
        assert!(original.is_complete() && replay.is_complete());
        assert_eq!(replay.usage(), original.usage());
        assert_eq!(replay.usage().output_tokens, 30);
        assert_eq!(mock.stats().received, 2);
    }

    /// A cache polled ready and then answering a hit gives the inner service's readiness up:
    /// tower's `ConcurrencyLimit` holds its permit from `poll_ready` to `call`, so a cache
    /// clone that kept it (a connection serving hits) would starve every other caller.
    #[tokio::test(start_paused = true)]
    async fn a_hit_does_not_keep_a_permit_reserved_below() {
        let mock = mock();
        let svc = ServiceBuilder::new()
            .layer(CacheLayer::memory(1 << 20))
            .layer(ConcurrencyLimitLayer::new(1))
            .service(mock.clone());
        let (s, _, _) = send_to(&svc, request("sk", BODY)).await;
        assert_eq!(s, CacheStatus::Miss);
        // One caller, kept alive, polled ready (the permit is reserved), then served a hit.
        let mut hits = svc.clone();
        let res = hits
            .ready()
            .await
            .unwrap()
            .call(request("sk", BODY))
            .await
            .unwrap();
        assert_eq!(
            res.extensions().get::<CacheStatus>(),
            Some(&CacheStatus::Hit)
        );
        // Another caller's miss gets the permit.
        let other = BODY.replace("hello", "goodbye");
        let miss = tokio::time::timeout(
            Duration::from_secs(30),
            send_to(&svc, request("sk", &other)),
        )
        .await
        .expect("the miss waits for a permit the hit's caller still holds");
        assert_eq!((miss.0, miss.1), (CacheStatus::Miss, StatusCode::OK));
        drop(hits);
    }

    #[tokio::test(start_paused = true)]
    async fn hits_cost_no_quota() {
        let mock = MockClaude::builder()
            .default_limits(MockLimits {
                rpm: 1,
                itpm: 1_000_000,
                otpm: 1_000_000,
            })
            .latency(Duration::from_millis(10), Duration::ZERO)
            .build();
        let svc = CacheLayer::memory(1 << 20).layer(mock.clone());
        assert_eq!(send_to(&svc, request("sk", BODY)).await.1, StatusCode::OK);
        for _ in 0..5 {
            let (s, code, _) = send_to(&svc, request("sk", BODY)).await;
            assert_eq!((s, code), (CacheStatus::Hit, StatusCode::OK));
        }
        // The bucket is empty: a new prompt gets a 429, which is not stored.
        let other = BODY.replace("hello", "goodbye");
        let (s, code, _) = send_to(&svc, request("sk", &other)).await;
        assert_eq!((s, code.as_u16()), (CacheStatus::Miss, 429));
        tokio::time::advance(Duration::from_secs(60)).await;
        let (s, code, _) = send_to(&svc, request("sk", &other)).await;
        assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
        assert_eq!(mock.stats().received, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_twins_reach_the_mock_once() {
        let mock = mock();
        let svc = CacheLayer::memory(1 << 20).layer(mock.clone());
        let answers = join_all((0..16).map(|_| send_to(&svc, request("sk", BODY)))).await;
        assert_eq!(mock.stats().received, 1);
        assert!(
            answers
                .iter()
                .all(|a| a.1 == StatusCode::OK && a.2 == answers[0].2)
        );
        let misses = answers.iter().filter(|a| a.0 == CacheStatus::Miss).count();
        assert_eq!(misses, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn mock_faults_are_never_cached() {
        let mock = mock();
        let svc = CacheLayer::memory(1 << 20).layer(mock.clone());
        mock.push_fault(Fault::MidStreamError);
        let res = svc
            .clone()
            .oneshot(request("sk", STREAM_BODY))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let cut = res.into_body().collect().await.unwrap().to_bytes();
        let t = track(&cut);
        assert!(t.error().is_some() && !t.is_complete());
        mock.push_fault(Fault::Overloaded);
        assert_eq!(send_to(&svc, request("sk", BODY)).await.1.as_u16(), 529);
        // Both go upstream again, and now succeed and are stored.
        assert_eq!(
            send_to(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Miss
        );
        assert_eq!(
            send_to(&svc, request("sk", BODY)).await.0,
            CacheStatus::Miss
        );
        assert_eq!(
            send_to(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Hit
        );
        assert_eq!(send_to(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
        assert_eq!(mock.stats().received, 4);
    }

    /// Cache -> hyper client -> loopback TCP -> MockClaude server.
    #[cfg(feature = "client")]
    #[tokio::test(start_paused = true)]
    async fn over_loopback_http() {
        use tower_claude::client::HttpClient;
        let mock = mock();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(mock.serve(listener));
        let svc = CacheLayer::memory(1 << 20).layer(HttpClient::new(base.parse().unwrap()));
        let (s, _, streamed) = send_to(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!(s, CacheStatus::Miss);
        let (s, _, replayed) = send_to(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!((s, &replayed), (CacheStatus::Hit, &streamed));
        assert!(track(&replayed).is_complete());
        assert_eq!(mock.stats().received, 1);
    }
}

/// Model honesty: an answer is stored under the model that produced it; an Opus request gets
/// the cached Sonnet answer only while fallback would send it to Sonnet now, never once Opus
/// has quota again, and never when the request turned fallback off. Every hit names its model.
mod models {
    use super::*;
    use tower_claude::anthropic::{KeyId, RateLimitGroup, RequestMeta};
    use tower_claude::fallback::{FallbackLayer, ServedModel};
    use tower_claude::quota::{Cost, Limits, QuotaBoard};

    const OPUS: &str = "claude-opus-4-7";
    const SONNET: &str = "claude-sonnet-4-6";

    fn ask(prompt: &str, fallback_off: bool) -> Request<RequestBody> {
        let body = format!(
            r#"{{"model":"{OPUS}","max_tokens":64,"temperature":0,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
        );
        let mut req = request("sk-ant-models", &body);
        if fallback_off {
            req.headers_mut()
                .insert("x-tower-claude-fallback", "off".parse().unwrap());
        }
        req
    }

    /// Opus down to 20 % of its requests for the test's key: fallback picks Sonnet.
    fn drain_opus(board: &QuotaBoard) {
        let opus = RateLimitGroup::new("claude-opus-4");
        let key = KeyId::from_api_key("sk-ant-models");
        board
            .try_acquire(&key, &opus, Cost::new(40, 0, 0))
            .unwrap()
            .settle(Cost::new(40, 0, 0));
    }

    async fn send<S, B>(svc: &S, req: Request<RequestBody>) -> (CacheStatus, String, String)
    where
        S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
        S::Error: std::fmt::Debug,
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let res = svc.clone().oneshot(req).await.unwrap();
        let status = *res.extensions().get::<CacheStatus>().unwrap();
        let header = res.headers()["x-tower-claude-model"]
            .to_str()
            .unwrap()
            .to_owned();
        if let Some(served) = res.extensions().get::<ServedModel>() {
            assert_eq!(&*served.served, header);
            assert_eq!(&*served.requested, OPUS);
        }
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["model"],
            header.as_str(),
            "the header names the writer"
        );
        (status, header, body["text"].as_str().unwrap().to_owned())
    }

    fn setup() -> (
        impl Service<
            Request<RequestBody>,
            Response = Response<impl http_body::Body<Data = Bytes, Error = tower_claude::BoxError>>,
            Error = tower_claude::BoxError,
        > + Clone,
        QuotaBoard,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        // An upstream that says which model answered, and counts its calls.
        let upstream = tower::service_fn(move |req: Request<RequestBody>| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let meta = RequestMeta::scan(req.body().as_ref())?;
                let model = meta.model.unwrap_or_default();
                let body = format!(r#"{{"type":"message","model":"{model}","text":"answer {n}"}}"#);
                let res = Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                Ok::<_, tower_claude::BoxError>(res)
            }
        });
        let board = QuotaBoard::builder()
            .limits(
                RateLimitGroup::new("claude-opus-4"),
                Limits::new(50, 30_000, 8_000),
            )
            .build();
        let fallback = FallbackLayer::new().board(board.clone());
        let svc = ServiceBuilder::new()
            .layer(CacheLayer::memory(1 << 20).fallback(fallback.handle()))
            .layer(fallback)
            .service(upstream);
        (svc, board, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_answer_is_served_only_while_fallback_would_choose_it() {
        let (svc, board, calls) = setup();
        drain_opus(&board);
        let (s, model, first) = send(&svc, ask("q", false)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Miss, SONNET));
        // Opus is still low: fallback would choose Sonnet, whose answer is served (and says so).
        let (s, model, again) = send(&svc, ask("q", false)).await;
        assert_eq!(
            (s, model.as_str(), &again),
            (CacheStatus::Hit, SONNET, &first)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Opus has its quota back: the Sonnet answer is not served as an Opus answer.
        tokio::time::advance(Duration::from_secs(60)).await;
        let (s, model, opus) = send(&svc, ask("q", false)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Miss, OPUS));
        assert_ne!(opus, first);
        let (s, model, _) = send(&svc, ask("q", false)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Hit, OPUS));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// The served model's name is the fallback catalogue's, shared: stored with the entry on
    /// the miss and named by the hit without a copy (`Arc::ptr_eq`).
    #[tokio::test(start_paused = true)]
    async fn the_served_models_name_is_shared_not_copied() {
        let (svc, board, _calls) = setup();
        drain_opus(&board);
        let served = |res: &Response<_>| {
            res.extensions()
                .get::<ServedModel>()
                .unwrap()
                .served
                .clone()
        };
        let miss = svc.clone().oneshot(ask("shared", false)).await.unwrap();
        assert_eq!(
            *miss.extensions().get::<CacheStatus>().unwrap(),
            CacheStatus::Miss
        );
        let written = served(&miss);
        assert_eq!(&*written, SONNET);
        drop(miss);
        let hit = svc.clone().oneshot(ask("shared", false)).await.unwrap();
        assert_eq!(
            *hit.extensions().get::<CacheStatus>().unwrap(),
            CacheStatus::Hit
        );
        assert!(Arc::ptr_eq(&served(&hit), &written));
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_off_is_honoured_on_a_hit() {
        let (svc, board, calls) = setup();
        drain_opus(&board);
        let (s, model, _) = send(&svc, ask("p", false)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Miss, SONNET));
        // The caller turned fallback off: the cached Sonnet answer is not for it.
        let (s, model, _) = send(&svc, ask("p", true)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Miss, OPUS));
        // Its Opus answer is then cached under Opus, and served to everyone.
        let (s, model, _) = send(&svc, ask("p", true)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Hit, OPUS));
        let (s, model, _) = send(&svc, ask("p", false)).await;
        assert_eq!((s, model.as_str()), (CacheStatus::Hit, OPUS));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

/// Only complete, valid Messages API answers are stored: a 200 whose body is invalid JSON,
/// HTML, a JSON array or garbage SSE ending in `message_stop` is forwarded but not cached.
#[tokio::test(start_paused = true)]
async fn invalid_200_bodies_are_never_stored() {
    let json = |body: &'static str| {
        Upstream::new(Duration::from_millis(10), move |_, _| {
            json_response(StatusCode::OK, body)
        })
    };
    for body in [
        r#"{"type":"message","content":["#,
        "<html><body>502 Bad Gateway</body></html>",
        "[1,2,3]",
        r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
        "",
    ] {
        let up = json(body);
        let svc = cache(&up);
        let (s, code, _, got) = send(&svc, request("sk", BODY)).await;
        assert_eq!(
            (s, code, &got[..]),
            (CacheStatus::Miss, StatusCode::OK, body.as_bytes())
        );
        assert_eq!(
            send(&svc, request("sk", BODY)).await.0,
            CacheStatus::Miss,
            "{body}"
        );
        assert_eq!(up.calls(), 2, "{body}");
    }
    for events in [
        &[
            "garbage\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ][..],
        &[
            "event: message_start\ndata: not json\n\n",
            "event: message_stop\ndata: {}\n\n",
        ][..],
        &[SSE_EVENTS[6]][..],
    ] {
        let events: Vec<&'static str> = events.to_vec();
        let up = Upstream::new(Duration::from_millis(10), move |_, _| {
            sse_response(chunks(sse_chunks(&events)))
        });
        let svc = cache(&up);
        assert_eq!(
            send(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Miss
        );
        assert_eq!(
            send(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Miss
        );
        assert_eq!(up.calls(), 2);
    }
}

/// The same with a layer below that reads the answer's usage (the rate limiter publishes the
/// answer's one `UsageTracker`): the cache takes its word on whether a JSON answer is a
/// Messages API answer (no second parse), and stores exactly what it stored before: the
/// message, none of the others, a JSON array typed `message` neither.
#[tokio::test(start_paused = true)]
async fn with_a_usage_tracker_below_only_messages_are_stored() {
    use tower_claude::rate_limit::RateLimitLayer;
    for (body, stored) in [
        (JSON_ANSWER, true),
        (r#"{"type":"message","content":["#, false),
        ("<html><body>502 Bad Gateway</body></html>", false),
        (r#"["message",null,null]"#, false),
        (
            r#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            false,
        ),
        (
            r#"{"type":"messages","usage":{"input_tokens":1,"output_tokens":1}}"#,
            false,
        ),
        (r#"{"usage":{"input_tokens":1,"output_tokens":1}}"#, false),
        ("", false),
    ] {
        let up = Upstream::new(Duration::from_millis(10), move |_, _| {
            json_response(StatusCode::OK, body)
        });
        let svc = ServiceBuilder::new()
            .layer(CacheLayer::memory(64 << 20))
            .layer(RateLimitLayer::new())
            .service(up.clone());
        let send = |svc: &Cache<_>| {
            let svc = svc.clone();
            async move {
                let res = svc.oneshot(request("sk", BODY)).await.unwrap();
                let status = *res.extensions().get::<CacheStatus>().unwrap();
                let got = res.into_body().collect().await.unwrap().to_bytes();
                (status, got)
            }
        };
        assert_eq!(send(&svc).await, (CacheStatus::Miss, Bytes::from(body)));
        let again = if stored {
            CacheStatus::Hit
        } else {
            CacheStatus::Miss
        };
        assert_eq!(send(&svc).await, (again, Bytes::from(body)), "{body}");
    }
}

/// A store that fails or hangs never fails or slows a request: answers are stored after they
/// are delivered, by a background task, and a failing store is a metric and a log line.
mod store_failures {
    use super::*;
    use tower_claude::cache::{
        CacheKey, CacheStore, CachedResponse, StoreError, StoreErrorKind, StoreFuture,
    };

    /// Every call fails (a full or read-only disk, a database error).
    struct Failing {
        puts: Arc<AtomicUsize>,
    }

    impl CacheStore for Failing {
        fn get(&self, _key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
            Box::pin(async { Err(StoreError::new(StoreErrorKind::Backend, "disk full")) })
        }
        fn put(&self, _: &CacheKey, _: CachedResponse, _: Duration) -> StoreFuture<()> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(StoreError::new(StoreErrorKind::Backend, "disk full")) })
        }
        fn remove(&self, _key: &CacheKey) -> StoreFuture<()> {
            Box::pin(async { Err(StoreError::new(StoreErrorKind::Backend, "disk full")) })
        }
    }

    /// Writes take a minute (a slow disk); lookups answer at once.
    struct Slow(MemoryStore);

    impl CacheStore for Slow {
        fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
            self.0.get(key)
        }
        fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
            let inner = self.0.clone();
            let key = *key;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                inner.put(&key, value, ttl).await
            })
        }
        fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
            self.0.remove(key)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_never_fails_a_request() {
        #[cfg(feature = "metrics")]
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        #[cfg(feature = "metrics")]
        let _guard = metrics::set_default_local_recorder(&recorder);
        let puts = Arc::new(AtomicUsize::new(0));
        let up = Upstream::json();
        let layer = CacheLayer::new(Failing { puts: puts.clone() });
        let svc = layer.clone().layer_on(up.clone());
        for _ in 0..3 {
            let (s, code, _, body) = send(&svc, request("sk", BODY)).await;
            assert_eq!(
                (s, code, &body[..]),
                (CacheStatus::Miss, StatusCode::OK, JSON_ANSWER.as_bytes())
            );
            layer.flush().await;
        }
        let (s, code, _, _) = send(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
        layer.flush().await;
        assert_eq!(
            puts.load(Ordering::SeqCst),
            4,
            "each answer was handed to the store"
        );
        assert_eq!(up.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_store_never_delays_a_request() {
        let up = Upstream::json();
        let layer = CacheLayer::new(Slow(MemoryStore::new(1 << 20)));
        let svc = layer.clone().layer_on(up.clone());
        let start = tokio::time::Instant::now();
        let (s, _, _, _) = send(&svc, request("sk", BODY)).await;
        assert_eq!(s, CacheStatus::Miss);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(100),
            "only the upstream's latency"
        );
        let start = tokio::time::Instant::now();
        let (s, _, _, _) = send(&svc, request("sk", STREAM_BODY)).await;
        assert_eq!(s, CacheStatus::Miss);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // While the write is pending, the answer is already served from the queue.
        assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
        assert_eq!(
            send(&svc, request("sk", STREAM_BODY)).await.0,
            CacheStatus::Hit
        );
        layer.flush().await;
        assert_eq!(send(&svc, request("sk", BODY)).await.0, CacheStatus::Hit);
        assert_eq!(up.calls(), 2);
    }

    /// A full write queue drops the entry (and counts it); the request is served as usual.
    #[tokio::test(start_paused = true)]
    async fn a_full_write_queue_drops_entries_not_requests() {
        let up = Upstream::json();
        let layer = CacheLayer::new(Slow(MemoryStore::new(1 << 20))).write_queue(1);
        let svc = layer.clone().layer_on(up.clone());
        for i in 0..4 {
            let body = BODY.replace("Say hello", &format!("Say hello {i}"));
            let (s, code, _, _) = send(&svc, request("sk", &body)).await;
            assert_eq!((s, code), (CacheStatus::Miss, StatusCode::OK));
        }
        layer.flush().await;
        let mut hits = 0;
        for i in 0..4 {
            let body = BODY.replace("Say hello", &format!("Say hello {i}"));
            hits += usize::from(send(&svc, request("sk", &body)).await.0 == CacheStatus::Hit);
        }
        assert!((1..4).contains(&hits), "some stored, some dropped: {hits}");
    }
}

/// Modes and the request header over real loopback HTTP through `claude-proxy`.
#[cfg(feature = "proxy")]
mod through_the_proxy {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::net::TcpListener;
    use tower_claude::proxy::{Cli, Proxy, ProxyConfig};

    async fn start(
        cli: Cli,
        env: &[(&str, &str)],
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let proxy = Proxy::new(ProxyConfig::resolve(cli, &env).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(proxy.serve(listener, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    /// The `x-tower-claude-cache` and `x-tower-claude-model` answers to one request.
    async fn ask(addr: std::net::SocketAddr, body: &str, header: Option<&str>) -> (String, String) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = Request::post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", "sk-ant-proxy-test")
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json");
        if let Some(h) = header {
            req = req.header("x-tower-claude-cache", h);
        }
        let res = client
            .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let get = |name: &str| {
            res.headers()
                .get(name)
                .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned())
        };
        let out = (get("x-tower-claude-cache"), get("x-tower-claude-model"));
        res.into_body().collect().await.unwrap();
        out
    }

    fn body(prompt: &str, temperature: Option<f64>) -> String {
        let t = temperature.map_or(String::new(), |t| format!(r#""temperature":{t},"#));
        format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":32,{t}"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
        )
    }

    fn cli(mode: Option<&str>) -> Cli {
        Cli {
            upstream: Some("mock".into()),
            cache_path: Some("memory".into()),
            cache_mode: mode.map(Into::into),
            ..Cli::default()
        }
    }

    #[tokio::test]
    async fn the_default_mode_and_the_header() {
        let (addr, _stop) = start(cli(None), &[]).await;
        let cached = |r: (String, String)| r.0;
        // temperature 0: cached, and a hit names its model.
        let t0 = body("deterministic", Some(0.0));
        assert_eq!(cached(ask(addr, &t0, None).await), "miss");
        assert_eq!(
            ask(addr, &t0, None).await,
            ("hit".into(), "claude-haiku-4-5".into())
        );
        // No temperature (the API default, 1.0): sampled, never cached without opting in.
        let sampled = body("sampled", None);
        assert_eq!(cached(ask(addr, &sampled, None).await), "bypass");
        assert_eq!(cached(ask(addr, &sampled, None).await), "bypass");
        assert_eq!(cached(ask(addr, &sampled, Some("use")).await), "miss");
        assert_eq!(cached(ask(addr, &sampled, Some("use")).await), "hit");
        // bypass and refresh.
        assert_eq!(cached(ask(addr, &t0, Some("bypass")).await), "bypass");
        assert_eq!(cached(ask(addr, &t0, Some("refresh")).await), "miss");
        assert_eq!(cached(ask(addr, &t0, None).await), "hit");
    }

    #[tokio::test]
    async fn mode_all_and_off() {
        let (addr, _stop) = start(cli(Some("all")), &[]).await;
        let sampled = body("sampled", Some(1.0));
        assert_eq!(ask(addr, &sampled, None).await.0, "miss");
        assert_eq!(ask(addr, &sampled, None).await.0, "hit");
        assert_eq!(ask(addr, &sampled, Some("bypass")).await.0, "bypass");
        // The environment variable, and `--cache false` as `off`.
        let (addr, _stop) = start(cli(None), &[("CLAUDE_PROXY_CACHE_MODE", "all")]).await;
        assert_eq!(ask(addr, &sampled, None).await.0, "miss");
        assert_eq!(ask(addr, &sampled, None).await.0, "hit");
        let off = Cli {
            cache: Some(false),
            ..cli(Some("all"))
        };
        let (addr, _stop) = start(off, &[]).await;
        let t0 = body("deterministic", Some(0.0));
        assert_eq!(ask(addr, &t0, Some("use")).await.0, "-");
        assert_eq!(ask(addr, &t0, Some("use")).await.0, "-");
    }
}

/// What an entry really costs in the memory store: resident memory per entry against
/// `CachedResponse::weight` (run with `--ignored --nocapture`; Linux only).
#[tokio::test]
#[ignore = "measurement, prints RSS per entry"]
async fn memory_store_rss_per_entry() {
    use tower_claude::cache::{CacheKey, CacheStore, CachedResponse};
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 4096
    }
    let store = MemoryStore::new(u64::MAX / 2);
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("request-id", "req_011CUZqFaKeKeYvAlUe4242".parse().unwrap());
    headers.insert(
        "anthropic-organization-id",
        "2f1e5e4a-0000-4000-8000-1234567890ab".parse().unwrap(),
    );
    let n = 200_000u32;
    let before = rss();
    let mut weight = 0u64;
    for i in 0..n {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        let entry = CachedResponse::new(
            StatusCode::OK,
            headers.clone(),
            Bytes::from(vec![b'x'; 600]),
            false,
        )
        .with_model("claude-haiku-4-5");
        weight += entry.weight() as u64;
        store
            .put(&CacheKey::from_bytes(k), entry, Duration::from_secs(3600))
            .await
            .unwrap();
    }
    let _ = store.entry_count();
    let after = rss();
    println!(
        "rss per entry {} bytes, weight per entry {} bytes",
        (after - before) / u64::from(n),
        weight / u64::from(n)
    );
}

/// The cache reads a stream's completeness from the one usage tracker, fed below it: when a
/// retry layer below held the stream back and already saw `message_stop`, the cache still
/// stores the entry only once every byte up to `message_stop` is recorded — the whole stream.
#[tokio::test(start_paused = true)]
async fn a_stream_held_back_below_is_stored_whole() {
    use tower_claude::anthropic::{BodyState, UsageTracker};
    use tower_claude::retry::RetryLayer;
    let up = Upstream::new(Duration::from_millis(100), |_, _| {
        // Content starts in the last chunk, with `message_stop`: the retry layer's hold-back
        // reads both chunks before the cache sees the first.
        let (first, rest) = SSE_EVENTS.split_at(1);
        sse_response(chunks(vec![
            Ok(Bytes::from(first.concat())),
            Ok(Bytes::from(rest.concat())),
        ]))
    });
    let svc = ServiceBuilder::new()
        .layer(CacheLayer::memory(64 << 20))
        .layer(RetryLayer::new())
        .service(up.clone());
    let res = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Miss)
    );
    let tracker = res.extensions().get::<UsageTracker>().unwrap().clone();
    let streamed = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&streamed[..], SSE_EVENTS.concat().as_bytes());
    assert_eq!(tracker.state(), BodyState::Complete);
    assert_eq!(tracker.usage().unwrap().output_tokens, 42);

    let res = svc
        .clone()
        .oneshot(request("sk", STREAM_BODY))
        .await
        .unwrap();
    assert_eq!(
        res.extensions().get::<CacheStatus>(),
        Some(&CacheStatus::Hit)
    );
    let replayed = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(replayed, streamed);
    assert_eq!(up.calls(), 1);
}
