//! The Redis backends against a local `redis-server` (started on a free port): one
//! `acquire` + `settle` of the quota board (the acquire is the one round trip on a request's
//! hot path; the settle is sent in the background), the same on the in-process board, and a
//! cache-store hit. Without `redis-server` on the PATH the Redis benches are skipped.
//!
//! Run: `cargo bench --features redis --bench redis -- --warm-up-time 1 --measurement-time 3`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tower_claude::anthropic::{KeyId, RateLimitGroup};
use tower_claude::cache::{CacheKey, CacheStore, CachedResponse, RedisStore};
use tower_claude::quota::{Cost, Limits, QuotaBoard, RedisOptions};

#[allow(dead_code)]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

fn limits() -> Limits {
    // Never binding: the bench measures the bookkeeping, not waiting.
    Limits::new(1 << 40, 1 << 40, 1 << 40)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let group = RateLimitGroup::new("claude-sonnet-4");
    let key = KeyId::named("bench");
    let cost = Cost::new(1, 1_000, 1_000);

    let local = QuotaBoard::builder()
        .limits(group.clone(), limits())
        .build();
    c.bench_function("quota/local acquire+settle", |b| {
        b.to_async(&rt).iter(|| async {
            let r = local
                .acquire(key.clone(), group.clone(), cost)
                .await
                .unwrap();
            r.settle(Cost::new(1, 1_000, 300));
        })
    });

    let Some(server) = redis_server::RedisServer::start() else {
        eprintln!("redis benches skipped: redis-server is not installed");
        return;
    };
    let board = rt.block_on(async {
        QuotaBoard::builder()
            .limits(group.clone(), limits())
            .build_redis(&server.url(), RedisOptions::new().key_prefix("bench:"))
            .await
            .unwrap()
    });
    c.bench_function("quota/redis acquire+settle", |b| {
        b.to_async(&rt).iter(|| async {
            let r = board
                .acquire(key.clone(), group.clone(), cost)
                .await
                .unwrap();
            r.settle(Cost::new(1, 1_000, 300));
        })
    });
    assert!(!board.redis_status().unwrap().degraded);
    // 8 concurrent callers, to show throughput over one multiplexed connection.
    c.bench_function("quota/redis acquire+settle x8 concurrent", |b| {
        b.to_async(&rt).iter(|| async {
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (board, key, group) = (board.clone(), key.clone(), group.clone());
                tasks.push(tokio::spawn(async move {
                    let r = board.acquire(key, group, cost).await.unwrap();
                    r.settle(Cost::new(1, 1_000, 300));
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    });

    let store = rt.block_on(async {
        RedisStore::connect(&server.url())
            .await
            .unwrap()
            .key_prefix("bench:cache:")
            .await
    });
    let ckey = CacheKey::from_bytes([3; 32]);
    let body = "x".repeat(2_000);
    let resp = CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        body.into(),
        false,
    );
    rt.block_on(store.put(&ckey, resp, Duration::from_secs(600)))
        .unwrap();
    c.bench_function("cache/redis get hit (2 KB)", |b| {
        b.to_async(&rt).iter(|| async {
            assert!(store.get(&ckey).await.unwrap().is_some());
        })
    });
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
