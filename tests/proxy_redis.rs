//! Two `claude-proxy` nodes sharing one quota through a real `redis-server`, over loopback
//! HTTP: together they never send more than the limit upstream; without Redis each node has
//! its own view and together they send about twice as much. Real time (Redis keeps its own
//! clock), a few seconds in all; skipped without `redis-server` unless `CI` is set.
#![cfg(all(feature = "proxy", feature = "redis"))]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::redis_server::RedisServer;
use tokio::net::TcpListener;
use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
use tower_claude::testing::{MockClaude, MockLimits};

const LIMIT: u64 = 20;

async fn node(
    upstream: SocketAddr,
    redis: Option<&str>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("tower-claude-node-{}.toml", std::process::id()));
    std::fs::write(
        &dir,
        format!("[limits.claude-haiku-4-5]\nrpm = {LIMIT}\nitpm = 1000000\notpm = 1000000\n"),
    )
    .unwrap();
    node_with(upstream, redis, Some(dir)).await
}

/// A node with this config file (`None`: no `[limits]`, every limit is learned from the
/// `anthropic-ratelimit-*` headers).
async fn node_with(
    upstream: SocketAddr,
    redis: Option<&str>,
    config: Option<std::path::PathBuf>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut env = BTreeMap::new();
    env.insert("ANTHROPIC_API_KEY".to_owned(), "sk-ant-shared".to_owned());
    env.insert("CLAUDE_PROXY_DEADLINE".to_owned(), "2s".to_owned());
    env.insert("CLAUDE_RETRY_STRATEGY".to_owned(), "none".to_owned());
    env.insert("CLAUDE_PROXY_FALLBACK".to_owned(), "false".to_owned());
    env.insert("CLAUDE_PROXY_CACHE".to_owned(), "false".to_owned());
    env.insert("CLAUDE_PROXY_NODES".to_owned(), "2".to_owned());
    // These tests are about sharing, not outages: on a loaded machine a Redis reply can take
    // longer than the default 1 s, and a node would then count the call as an outage and
    // admit on its local share (by design), which is not what is measured here.
    env.insert(
        "CLAUDE_PROXY_REDIS_QUOTA_TIMEOUT".to_owned(),
        "5s".to_owned(),
    );
    if let Some(url) = redis {
        env.insert("REDIS_URL".to_owned(), url.to_owned());
    }
    let cli = Cli {
        config,
        upstream: Some(format!("http://{upstream}")),
        ..Cli::default()
    };
    let config = ProxyConfig::resolve(cli, &env).expect("config");
    let proxy = Proxy::connect(config).await.expect("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = proxy.serve(listener, std::future::pending()).await;
    });
    (addr, task)
}

/// Sends `n` requests, alternating between the two nodes, all at once; returns how many the
/// clients got answered 200.
async fn burst(nodes: [SocketAddr; 2], n: usize) -> usize {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let calls = (0..n).map(|i| {
        let client = client.clone();
        let addr = nodes[i % 2];
        async move {
            let body = format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
            );
            let req = Request::post(format!("http://{addr}/v1/messages"))
                .header("x-api-key", "client")
                .header("anthropic-version", "2023-06-01")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = client.request(req).await.expect("the proxy answers");
            let ok = resp.status().is_success();
            resp.into_body().collect().await.unwrap();
            ok
        }
    });
    join_all(calls).await.into_iter().filter(|ok| *ok).count()
}

fn upstream() -> MockClaude {
    MockClaude::builder()
        .limits(
            "claude-haiku-4-5",
            MockLimits {
                rpm: LIMIT,
                itpm: 1_000_000,
                otpm: 1_000_000,
            },
        )
        .latency(Duration::from_millis(5), Duration::ZERO)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_quota_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };

    // With Redis: both nodes draw from one bucket.
    let mock = upstream();
    let (up, _server) = mock.serve_on_loopback().await.unwrap();
    let (a, ta) = node(up, Some(&redis.url())).await;
    let (b, tb) = node(up, Some(&redis.url())).await;
    let ok = burst([a, b], 2 * LIMIT as usize).await;
    let shared = mock.stats();
    ta.abort();
    tb.abort();
    println!(
        "with Redis: {ok} answered, upstream saw {} requests, {} refused (429)",
        shared.received, shared.rate_limited
    );
    // One minute's limit plus what refills during the 2 s deadline (20/min: under 1).
    assert!(shared.received <= LIMIT + 1, "{shared:?}");
    assert_eq!(shared.rate_limited, 0);

    // Without Redis: each node believes it has the whole limit.
    let mock = upstream();
    let (up, _server) = mock.serve_on_loopback().await.unwrap();
    let (a, ta) = node(up, None).await;
    let (b, tb) = node(up, None).await;
    let _ = burst([a, b], 2 * LIMIT as usize).await;
    let alone = mock.stats();
    ta.abort();
    tb.abort();
    println!(
        "without Redis: upstream saw {} requests, {} refused (429)",
        alone.received, alone.rate_limited
    );
    // Each node believes it has the whole limit: together they send well over it. How far
    // over depends on how many of a node's requests go out before its first 429 comes back
    // (it holds the rest then): all 40 on a quiet machine, 37 seen on a loaded one.
    assert!(alone.received >= LIMIT + LIMIT / 2, "{alone:?}");
    assert!(alone.rate_limited >= LIMIT / 2, "{alone:?}");
}

/// No `[limits]` configured, both nodes cold: the nodes learn the limits from the first
/// answer's headers. One node holds the learning lock and sends the only probe; every other
/// request, on both nodes, waits for the limits to reach Redis and takes its quota there, so
/// upstream sees the limit, not a burst of twice the limit (nor a probe per node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_learned_limits_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = upstream();
    let (up, _server) = mock.serve_on_loopback().await.unwrap();
    let (a, ta) = node_with(up, Some(&redis.url()), None).await;
    let (b, tb) = node_with(up, Some(&redis.url()), None).await;
    let ok = burst([a, b], 2 * LIMIT as usize).await;
    let stats = mock.stats();
    ta.abort();
    tb.abort();
    println!(
        "learned limits, with Redis: {ok} answered, upstream saw {} requests, {} refused (429)",
        stats.received, stats.rate_limited
    );
    // The probe is counted in Redis (seeded from the server's `remaining`): nothing beyond
    // the limit goes out but what refills during the burst (20 a minute: under one).
    assert!(stats.received <= LIMIT + 1, "{stats:?}");
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    // The limit is used, not starved.
    assert!(ok as u64 >= LIMIT - 1, "{ok} answered; {stats:?}");
}

/// No `[limits]` configured, and one node has already learned them when the burst comes: the
/// other node adopts them from Redis instead of probing, so upstream sees the limit plus the
/// first node's probe only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_adopts_the_limits_the_first_learned() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = upstream();
    let (up, _server) = mock.serve_on_loopback().await.unwrap();
    let (a, ta) = node_with(up, Some(&redis.url()), None).await;
    let (b, tb) = node_with(up, Some(&redis.url()), None).await;
    // One request through node A: its probe teaches the limits (and seeds Redis).
    assert_eq!(burst([a, a], 1).await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ok = burst([a, b], 2 * LIMIT as usize).await;
    let stats = mock.stats();
    ta.abort();
    tb.abort();
    println!(
        "limits learned by node A first: {} answered, upstream saw {} requests, {} refused (429)",
        ok + 1,
        stats.received,
        stats.rate_limited
    );
    // Node B sent no probe of its own: nothing beyond the limit went out, nothing was refused
    // (with a probe of its own, upstream saw 21 and refused 1).
    assert!(stats.received <= LIMIT, "{stats:?}");
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert!(ok as u64 + 1 >= LIMIT - 1, "{ok} answered; {stats:?}");
}

/// Two nodes with the cache on (and the same default disk-cache path, as two nodes started in
/// one directory would have): both start, since the cache lives in Redis, and an answer one
/// node got is a hit on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_the_cache_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mock = upstream();
    let (up, _server) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("cache.redb");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut env = BTreeMap::new();
        env.insert("ANTHROPIC_API_KEY".to_owned(), "sk-ant-shared".to_owned());
        env.insert("REDIS_URL".to_owned(), redis.url());
        env.insert(
            "CLAUDE_PROXY_CACHE_PATH".to_owned(),
            disk.display().to_string(),
        );
        let cli = Cli {
            upstream: Some(format!("http://{up}")),
            ..Cli::default()
        };
        let config = ProxyConfig::resolve(cli, &env).expect("config");
        let proxy = Proxy::connect(config)
            .await
            .expect("a second node in the same place starts too");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = proxy.serve(listener, std::future::pending()).await;
        });
        nodes.push((addr, task));
    }
    assert!(!disk.exists(), "no disk cache is opened with REDIS_URL");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":16,"temperature":0,"messages":[{"role":"user","content":"shared"}]}"#;
    let mut caches = Vec::new();
    for (addr, _) in &nodes {
        let req = Request::post(format!("http://{addr}/v1/messages"))
            .header("x-api-key", "client")
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert!(resp.status().is_success());
        caches.push(
            resp.headers()["x-tower-claude-cache"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        resp.into_body().collect().await.unwrap();
        // The answer reaches Redis just after it is delivered (the cache stores in the
        // background): give that one round trip time before asking the other node.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(caches, ["miss", "hit"]);
    assert_eq!(mock.stats().received, 1);
    for (_, task) in nodes {
        task.abort();
    }
}
