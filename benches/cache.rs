//! Cache hit path through `CacheLayer` (memory and disk stores, 10 KB and 100 KB answers), the
//! streaming miss path (a 100-event SSE answer recorded and stored), and the cost of the key:
//! the request parse, and BLAKE3 against SHA-256 on 10 KB.
//!
//! `cargo bench --bench cache --all-features -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt, service_fn};
use tower_claude::body::RequestBody;
use tower_claude::cache::{CacheLayer, CacheStatus};
use tower_layer::Layer;

/// A realistic request: a system prompt and three turns, about 2.6 KB.
fn request_body(max_tokens: usize) -> String {
    let turn = "Refactor this function so that it returns an iterator instead of a Vec. ".repeat(8);
    format!(
        r#"{{"model":"claude-sonnet-4-6","max_tokens":{max_tokens},"temperature":0,"system":"{}","messages":[{{"role":"user","content":"{turn}"}},{{"role":"assistant","content":"{turn}"}},{{"role":"user","content":"{turn}"}}]}}"#,
        "You are a careful senior Rust engineer. ".repeat(20)
    )
}

fn request(body: &Bytes) -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", "sk-ant-bench")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(RequestBody::from(body.clone()))
        .unwrap()
}

fn answer(size: usize) -> Bytes {
    let text = "x".repeat(size.saturating_sub(200));
    Bytes::from(format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","content":[{{"type":"text","text":"{text}"}}],"usage":{{"input_tokens":900,"output_tokens":2500}}}}"#
    ))
}

fn bench_hits(c: &mut Criterion, store_name: &str, layer: impl Fn() -> CacheLayer) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group(format!("cache_hit/{store_name}"));
    for size in [10 * 1024, 100 * 1024] {
        // One request per answer size, so that a shared store holds both entries.
        let body = Bytes::from(request_body(size));
        let answer = answer(size);
        let upstream = service_fn(move |_req: Request<RequestBody>| {
            let answer = answer.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(answer))
                        .unwrap(),
                )
            }
        });
        let mut svc = layer().layer(upstream);
        rt.block_on(async {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(request(&body))
                .await
                .unwrap();
            assert_eq!(
                res.extensions().get::<CacheStatus>(),
                Some(&CacheStatus::Miss)
            );
            res.into_body().collect().await.unwrap();
        });
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{}KB", size / 1024)),
            |b| {
                b.to_async(&rt).iter(|| {
                    let svc = svc.clone();
                    let req = request(&body);
                    async move {
                        let res = svc.oneshot(req).await.unwrap();
                        debug_assert_eq!(
                            res.extensions().get::<CacheStatus>(),
                            Some(&CacheStatus::Hit)
                        );
                        black_box(res.into_body().collect().await.unwrap().to_bytes())
                    }
                })
            },
        );
    }
    group.finish();
}

fn memory(c: &mut Criterion) {
    bench_hits(c, "memory", || CacheLayer::memory(256 * 1024 * 1024));
}

#[cfg(feature = "disk-cache")]
fn disk(c: &mut Criterion) {
    use tower_claude::cache::DiskStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.redb");
    let store = std::sync::Arc::new(DiskStore::open(&path, 1024 * 1024 * 1024).unwrap());
    bench_hits(c, "disk", || CacheLayer::with_shared_store(store.clone()));
}

#[cfg(not(feature = "disk-cache"))]
fn disk(_c: &mut Criterion) {}

/// A streaming miss: a new prompt each time, answered with 100 SSE events (about 16 KB) that
/// the cache forwards, records and stores after `message_stop`.
fn stream_miss(c: &mut Criterion) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events: Vec<Bytes> = vec![Bytes::from_static(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":900,\"output_tokens\":1}}}\n\n",
    )];
    for _ in 0..98 {
        events.push(Bytes::from_static(
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"fn iter(&self) -> impl Iterator<Item = &T> { self.items.iter() } \"}}\n\n",
        ));
    }
    events.push(Bytes::from_static(
        b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ));
    let size: usize = events.iter().map(Bytes::len).sum();
    let upstream = service_fn(move |_req: Request<RequestBody>| {
        let frames = events
            .clone()
            .into_iter()
            .map(|e| Ok::<_, Infallible>(http_body::Frame::data(e)));
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(http_body_util::StreamBody::new(futures_util::stream::iter(
                        frames,
                    )))
                    .unwrap(),
            )
        }
    });
    let stack = {
        use tower_claude::stack::{CacheConfig, ClaudeStack, StackConfig};
        let config = StackConfig {
            cache: CacheConfig::Memory {
                max_bytes: 256 * 1024 * 1024,
            },
            limits: [(
                "claude-sonnet-4".to_owned(),
                tower_claude::quota::Limits::new(u64::MAX / 4, u64::MAX / 4, u64::MAX / 4),
            )]
            .into(),
            ..StackConfig::default()
        };
        ClaudeStack::from_config(&config)
            .unwrap()
            .service(upstream.clone())
    };
    let svc = CacheLayer::memory(256 * 1024 * 1024).layer(upstream);
    let n = AtomicU64::new(0);
    let mut group = c.benchmark_group("cache_miss");
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function("stream_100_events", |b| {
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            let i = n.fetch_add(1, Ordering::Relaxed);
            let body = Bytes::from(format!(
                r#"{{"model":"claude-sonnet-4-6","max_tokens":4096,"stream":true,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
            ));
            async move {
                let res = svc.oneshot(request(&body)).await.unwrap();
                debug_assert_eq!(
                    res.extensions().get::<CacheStatus>(),
                    Some(&CacheStatus::Miss)
                );
                black_box(res.into_body().collect().await.unwrap().to_bytes())
            }
        })
    });
    // The same miss through the whole stack as `claude-proxy` builds it (cache, fallback,
    // retry, rate limit, concurrency): every layer that reads the stream reads it.
    group.bench_function("stack_stream_100_events", |b| {
        b.to_async(&rt).iter(|| {
            let svc = stack.clone();
            let i = n.fetch_add(1, Ordering::Relaxed);
            let body = Bytes::from(format!(
                r#"{{"model":"claude-sonnet-4-6","max_tokens":4096,"stream":true,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
            ));
            async move {
                let res = svc.oneshot(request(&body)).await.unwrap();
                black_box(res.into_body().collect().await.unwrap().to_bytes())
            }
        })
    });
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let data = vec![0x61u8; 10 * 1024];
    let mut group = c.benchmark_group("hash_10KB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("blake3", |b| {
        b.iter(|| black_box(blake3::hash(black_box(&data))))
    });
    group.bench_function("sha256_ring", |b| {
        b.iter(|| {
            black_box(ring::digest::digest(
                &ring::digest::SHA256,
                black_box(&data),
            ))
        })
    });
    group.finish();

    // The request parse that the key needs (part of every `cache_hit` sample).
    let body = Bytes::from(request_body(1024));
    let mut group = c.benchmark_group("key");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse_request_json", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, memory, disk, stream_miss, hashing);
criterion_main!(benches);
