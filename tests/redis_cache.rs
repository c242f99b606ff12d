//! RedisStore against a real `redis-server`: two cache layers (two nodes) sharing one Redis
//! share hits; TTLs expire; an unreachable Redis is a miss, never a failure. Real time (Redis
//! expires on its own clock); skipped without `redis-server` unless `CI` is set.
#![cfg(all(feature = "redis", feature = "testing"))]

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::redis_server::RedisServer;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::body::RequestBody;
use tower_claude::cache::{CacheKey, CacheLayer, CacheStore, CachedResponse, RedisStore};
use tower_claude::testing::MockClaude;

fn request() -> Request<RequestBody> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", "sk-ant-cache")
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(
            r#"{"model":"claude-haiku-4-5","max_tokens":50,"temperature":0,"messages":[{"role":"user","content":"same question"}]}"#,
        ))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_hits_through_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mock = MockClaude::builder().build();
    let mut nodes = Vec::new();
    let mut secrets = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(&server.url())
            .await
            .unwrap()
            .key_prefix("c1:")
            .await;
        // The first store set the shared secret (`SET NX`), the second read it.
        secrets.push(store.secret().expect("a secret shared through Redis"));
        let layer = CacheLayer::new(store);
        nodes.push((
            layer.clone(),
            ServiceBuilder::new().layer(layer).service(mock.clone()),
        ));
    }
    let mut bodies = Vec::new();
    let mut statuses = Vec::new();
    for (layer, node) in nodes.iter_mut() {
        let res = node.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        statuses.push(
            res.headers()["x-tower-claude-cache"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        bodies.push(res.into_body().collect().await.unwrap().to_bytes());
        // Stored after delivery, in the background (one pipelined batch).
        layer.flush().await;
    }
    assert_eq!(statuses, ["miss", "hit"]);
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(mock.stats().received, 1);
    assert_eq!(secrets[0], secrets[1]);
    // Another namespace has a secret of its own; the same one again reads the first.
    let other = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .key_prefix("c1-other:")
        .await;
    assert_ne!(other.secret().unwrap(), secrets[0]);
    let again = other.key_prefix("c1:").await;
    assert_eq!(again.secret().unwrap(), secrets[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_and_undecodable_entries_are_misses() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .key_prefix("c2:")
        .await;
    let key = CacheKey::from_bytes([7; 32]);
    let resp = CachedResponse::new(StatusCode::OK, http::HeaderMap::new(), "{}".into(), false);
    store
        .put(&key, resp.clone(), Duration::from_millis(150))
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(resp.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.get(&key).await.unwrap(), None);

    store
        .put(&key, resp.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    store.remove(&key).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);

    // Garbage under the key: a miss.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let raw_key = format!("c2:{key}");
    redis::cmd("SET")
        .arg(&raw_key)
        .arg("not an entry")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&raw_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, None, "the bad entry is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_a_miss_not_a_failure() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let mock = MockClaude::builder().build();
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .key_prefix("c3:")
        .await;
    let layer = CacheLayer::new(store.clone());
    let mut svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(mock.clone());
    server.stop();
    for _ in 0..2 {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
        // The write fails in the background (counted, logged); the request did not.
        layer.flush().await;
    }
    assert_eq!(mock.stats().received, 2);
    assert!(store.get(&CacheKey::from_bytes([1; 32])).await.is_err());
    // Back: entries are stored and shared again.
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        let hit = res.headers()["x-tower-claude-cache"] == "hit";
        res.into_body().collect().await.unwrap();
        if hit {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hit after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 18: during a Redis outage every lookup waited for the reconnect and command
/// timeouts (p50 755 ms). After one failed command the store's breaker answers at once (a
/// miss), and after Redis is back one probe closes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_costs_one_timeout_then_lookups_fail_fast_and_recover() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .key_prefix("breaker:")
        .await;
    let key = CacheKey::from_bytes([7; 32]);
    let value = CachedResponse::new(
        StatusCode::OK,
        http::HeaderMap::new(),
        r#"{"type":"message"}"#.into(),
        false,
    );
    store
        .put(&key, value.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(store.get(&key).await.unwrap().is_some());

    server.stop();
    // The first command after the outage finds out (it may take the timeouts).
    assert!(store.get(&key).await.is_err());
    // The next ones do not touch the network: the breaker answers at once.
    for _ in 0..20 {
        let err = store.get(&key).await.unwrap_err();
        assert!(err.to_string().contains("circuit open"), "{err}");
    }

    server.restart();
    // After the open period one probe goes through; its success closes the breaker.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if store
            .put(&key, value.clone(), Duration::from_secs(60))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store never recovered"
        );
    }
    assert!(store.get(&key).await.unwrap().is_some());
}
