//! Cost of the quota board and of `RateLimitLayer`, next to `tower::limit::RateLimit`; and of
//! the whole `ClaudeStack` (no cache, so every request goes through every layer), next to the
//! plain Tower stack for the same jobs (`tower_reference_stack`).
//!
//! `cargo bench --bench rate_limit -- --warm-up-time 1 --measurement-time 3`
//!
//! With the `proxy` feature (so with `--all-features`) the bench allocates with mimalloc, as
//! `claude-proxy` does: `ClaudeStack_without_cache` is then the stack as the proxy runs it.
//! Without it, the system allocator (a library sets no global allocator).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::BoxError;
use tower_claude::anthropic::{KeyId, RateLimitGroup};
use tower_claude::body::RequestBody;
use tower_claude::quota::{Cost, Limits, QuotaBoard};
use tower_claude::rate_limit::RateLimitLayer;

// The proxy's allocator (see the module docs).
#[cfg(feature = "proxy")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BIG: Limits = Limits::new(u64::MAX / 4, u64::MAX / 4, u64::MAX / 4);

fn board() -> (QuotaBoard, KeyId, RateLimitGroup) {
    let group = RateLimitGroup::new("claude-sonnet-4");
    let board = QuotaBoard::builder().limits(group.clone(), BIG).build();
    (board, KeyId::named("k"), group)
}

fn bench_board(c: &mut Criterion) {
    let mut g = c.benchmark_group("board");
    let (board, key, group) = board();
    let cost = Cost::new(1, 1_000, 1_024);
    let actual = Cost::new(1, 1_000, 200);
    g.bench_function("acquire_settle_uncontended", |b| {
        b.iter(|| {
            let r = board.try_acquire(&key, &group, black_box(cost)).unwrap();
            r.settle(black_box(actual));
        })
    });
    g.bench_function("acquire_settle_2_threads", |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(2);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let t = Instant::now();
                            for _ in 0..iters {
                                let r = board.try_acquire(&key, &group, cost).unwrap();
                                r.settle(actual);
                            }
                            t.elapsed()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .max()
                    .unwrap_or(Duration::ZERO)
            })
        })
    });
    g.finish();
}

const BODY: &str = r#"{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[{"role":"user","content":"Write a haiku about Rust and rate limits, please."}]}"#;
const ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"ok"}],"usage":{"input_tokens":25,"output_tokens":12}}"#;

/// The request of every iteration, from static names and values (the bench's own work, not
/// the stack's): no header name parsed and no value copied per request, and header values
/// whose clones do not allocate, as those of a server's parser (hyper's are slices of its
/// read buffer; a value copied from a `&str` allocates on its first clone).
fn request() -> Request<RequestBody> {
    static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
    let mut req = Request::new(RequestBody::from(BODY));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::from_static("https://api.anthropic.com/v1/messages");
    let headers = req.headers_mut();
    headers.insert(&X_API_KEY, HeaderValue::from_static("sk-ant-bench"));
    headers.insert(&ANTHROPIC_VERSION, HeaderValue::from_static("2023-06-01"));
    req
}

fn ready_inner()
-> impl Service<Request<RequestBody>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone {
    tower::service_fn(|_req: Request<RequestBody>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
            ANSWER.as_bytes(),
        ))))
    })
}

async fn one<S, B>(svc: &mut S)
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let resp = svc.ready().await.unwrap().call(request()).await.unwrap();
    black_box(resp.into_body().collect().await.unwrap());
}

/// A retry policy that keeps a copy of every request (as a retry layer must, to resend it)
/// and retries nothing: the reference stack's retry, on answers that all succeed.
#[derive(Clone)]
struct KeepCopy;

impl<Res, E> tower::retry::Policy<Request<RequestBody>, Res, E> for KeepCopy {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<RequestBody>,
        _result: &mut Result<Res, E>,
    ) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Request<RequestBody>) -> Option<Request<RequestBody>> {
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}

fn bench_layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("layer_on_ready_service");
    // Every variant runs one request to its end on the same current-thread runtime.
    g.bench_function("inner_only", |b| {
        let mut svc = ready_inner();
        b.iter(|| rt.block_on(one(&mut svc)));
    });
    g.bench_function("tower_limit_RateLimit", |b| {
        let _guard = rt.enter();
        let mut svc = ServiceBuilder::new()
            .rate_limit(u64::MAX / 4, Duration::from_secs(60))
            .service(ready_inner());
        b.iter(|| rt.block_on(one(&mut svc)));
    });
    g.bench_function("RateLimitLayer", |b| {
        let (board, _, _) = board();
        let mut svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new().board(board).default_limits(BIG))
            .service(ready_inner());
        b.iter(|| rt.block_on(one(&mut svc)));
    });
    // Issue 14's point of comparison: tower's own middleware for the same jobs (a buffer, a
    // concurrency cap, a rate limit, a retry that keeps a copy of each request for a resend)
    // around a service that reads the request and the answer with serde_json (a full parse of
    // each, where the stack scans the request once and reads the answer's usage). Beside
    // `ClaudeStack_without_cache` in one run, it says what the stack costs against the plain
    // Tower stack a user would otherwise write, on the same machine.
    g.bench_function("tower_reference_stack", |b| {
        let _guard = rt.enter();
        let inner = tower::service_fn(|req: Request<RequestBody>| async move {
            let request: serde_json::Value = serde_json::from_slice(req.body().bytes())?;
            black_box(request);
            let answer: serde_json::Value = serde_json::from_slice(ANSWER.as_bytes())?;
            black_box(&answer["usage"]);
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                ANSWER.as_bytes(),
            ))))
        });
        let mut svc = ServiceBuilder::new()
            .buffer(1024)
            .concurrency_limit(64)
            .rate_limit(u64::MAX / 4, Duration::from_secs(60))
            .retry(KeepCopy)
            .service(inner);
        b.iter(|| rt.block_on(one(&mut svc)));
    });
    g.bench_function("ClaudeStack_without_cache", |b| {
        use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
        let config = StackConfig {
            cache: CacheConfig::Off,
            limits: [("claude-sonnet-4".to_owned(), BIG)].into(),
            max_in_flight: Some(64),
            ..StackConfig::default()
        };
        let inner = tower::service_fn(|_req: Request<RequestBody>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(
                ANSWER.as_bytes(),
            ))))
        });
        let mut svc = ClaudeStack::from_config(&config).unwrap().service(inner);
        b.iter(|| rt.block_on(one(&mut svc)));
    });
    g.finish();
}

criterion_group!(benches, bench_board, bench_layer);
criterion_main!(benches);
