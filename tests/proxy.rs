//! `claude-proxy` over real loopback HTTP: a hyper-util client talks to the proxy, which talks
//! to the served simulator (or its built-in one).
#![cfg(feature = "proxy")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::proxy::start;
use tokio::net::TcpListener;
use tower_claude::anthropic::{ApiError, ApiErrorKind, RateLimitSnapshot, StreamTracker, Usage};
use tower_claude::proxy::Cli;
use tower_claude::testing::MockClaude;

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn messages(addr: SocketAddr, key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

const HELLO: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}"#;
const HELLO_STREAM: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

async fn served_mock(mock: &MockClaude) -> SocketAddr {
    let (addr, _task) = mock.serve_on_loopback().await.unwrap();
    addr
}

fn cli_for(upstream: String) -> Cli {
    Cli {
        upstream: Some(upstream),
        cache_path: Some("memory".into()),
        ..Cli::default()
    }
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let proxy = start(cli_for("mock".into()), &[]).await;
    let c = client();
    let resp = c
        .get(format!("http://{}/healthz", proxy.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = c
        .get(format!("http://{}/nope", proxy.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let err = ApiError::from_response(StatusCode::NOT_FOUND, &body);
    assert_eq!(err.kind(), ApiErrorKind::NotFound);
    proxy.stop().await;
}

#[tokio::test]
async fn forwards_json_answers_and_every_upstream_header() {
    let mock = MockClaude::builder().build();
    let upstream = served_mock(&mock).await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let resp = client()
        .request(messages(proxy.addr, "sk-client-1", HELLO))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("request-id"));
    let snap = RateLimitSnapshot::from_headers(resp.headers());
    assert!(snap.requests.limit.is_some() && snap.input_tokens.remaining.is_some());
    assert!(snap.output_tokens.reset.is_some());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let usage = Usage::from_json(&body).expect("usage");
    assert!(usage.output_tokens > 0);
    assert_eq!(mock.stats().accepted, 1);
    proxy.stop().await;
}

#[tokio::test]
async fn streams_pass_through_event_by_event() {
    let mock = MockClaude::builder()
        .latency(Duration::from_millis(1), Duration::from_millis(1))
        .build();
    let upstream = served_mock(&mock).await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let resp = client()
        .request(messages(proxy.addr, "sk-client-1", HELLO_STREAM))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body();
    let mut tracker = StreamTracker::new();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            tracker.feed(&data);
        }
    }
    tracker.finish();
    assert!(tracker.is_complete());
    assert!(tracker.usage().output_tokens > 0);
    assert!(
        frames > 1,
        "the stream arrived in one piece: {frames} frame(s)"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn client_tokens_guard_the_proxy_and_the_proxy_key_goes_upstream() {
    let mock = MockClaude::builder()
        .api_keys(["sk-upstream-secret"])
        .build();
    let upstream = served_mock(&mock).await;
    let proxy = start(
        cli_for(format!("http://{upstream}")),
        &[
            ("CLAUDE_PROXY_TOKENS", "team-token"),
            ("ANTHROPIC_API_KEY", "sk-upstream-secret"),
        ],
    )
    .await;
    let c = client();
    let denied = c
        .request(messages(proxy.addr, "wrong", HELLO))
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let ok = c
        .request(messages(proxy.addr, "team-token", HELLO))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        mock.stats().received,
        1,
        "the denied request never went upstream"
    );
    // The status page is behind the tokens too; health and metrics are not.
    let get = |path: &str, token: Option<&str>| {
        let mut req = Request::get(format!("http://{}{path}", proxy.addr));
        if let Some(t) = token {
            req = req.header("x-api-key", t);
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };
    for (path, token, expected) in [
        ("/v1/proxy/status", None, StatusCode::UNAUTHORIZED),
        ("/v1/proxy/status", Some("wrong"), StatusCode::UNAUTHORIZED),
        ("/v1/proxy/status", Some("team-token"), StatusCode::OK),
        ("/healthz", None, StatusCode::OK),
    ] {
        let resp = c.request(get(path, token)).await.unwrap();
        assert_eq!(resp.status(), expected, "{path} with {token:?}");
    }
    proxy.stop().await;
}

/// The proxy holds two upstream keys, one of them revoked: the status page shows the pool
/// (key ids only), with the revoked key out of rotation.
#[tokio::test]
async fn status_page_shows_the_proxys_keys() {
    let mock = MockClaude::builder().api_keys(["sk-upstream-good"]).build();
    let upstream = served_mock(&mock).await;
    let proxy = start(
        cli_for(format!("http://{upstream}")),
        &[
            ("ANTHROPIC_API_KEYS", "sk-upstream-good,sk-upstream-revoked"),
            ("CLAUDE_RETRY_STRATEGY", "none"),
        ],
    )
    .await;
    let c = client();
    let mut statuses = Vec::new();
    for i in 0..3 {
        // Distinct prompts: a cache hit would not reach the pool.
        let body = format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
        );
        let resp = c.request(messages(proxy.addr, "any", &body)).await.unwrap();
        statuses.push(resp.status());
        resp.into_body().collect().await.unwrap();
    }
    // The revoked key is tried once (its 401 passes through), then only the good one serves.
    let unauthorized = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert!(unauthorized <= 1, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&StatusCode::OK));
    let resp = c
        .get(
            format!("http://{}/v1/proxy/status", proxy.addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("sk-upstream"), "no key in clear: {text}");
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let keys = status["keys"]
        .as_array()
        .expect("the proxy's keys are listed");
    assert_eq!(keys.len(), 2);
    for k in keys {
        assert!(k["key_id"].as_str().unwrap().starts_with("k-"));
    }
    let requests: u64 = keys.iter().map(|k| k["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 3);
    if unauthorized == 1 {
        let removed: Vec<_> = keys.iter().filter(|k| k["state"] == "removed").collect();
        assert_eq!(removed.len(), 1, "{text}");
        assert_eq!(removed[0]["removed"]["reason"], "rejected (401)");
    }
    assert!(status["redis"].is_null(), "no Redis configured");
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_body_is_a_413_envelope() {
    let proxy = start(cli_for("mock".into()), &[]).await;
    let big = format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(33 * 1024 * 1024)
    );
    let resp = client()
        .request(messages(proxy.addr, "sk-client-1", &big))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        ApiError::from_response(StatusCode::PAYLOAD_TOO_LARGE, &body).kind(),
        ApiErrorKind::RequestTooLarge
    );
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_envelope() {
    // Bind then drop a listener: the port is (almost certainly) closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start(
        cli_for(format!("http://{closed}")),
        &[("CLAUDE_RETRY_STRATEGY", "none")],
    )
    .await;
    let resp = client()
        .request(messages(proxy.addr, "sk-client-1", HELLO))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        ApiError::from_response(StatusCode::BAD_GATEWAY, &body).kind(),
        ApiErrorKind::Api
    );
    proxy.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let mock = MockClaude::builder()
        .latency(Duration::from_millis(300), Duration::ZERO)
        .build();
    let upstream = served_mock(&mock).await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let c = client();
    let req = messages(proxy.addr, "sk-client-1", HELLO);
    let in_flight = tokio::spawn(async move { c.request(req).await });
    // Let the request reach the simulator, then ask the proxy to stop.
    while mock.stats().received == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.stop().await;
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(Usage::from_json(&body).is_some());
}

#[tokio::test]
async fn status_page_and_prometheus_metrics() {
    let mock = MockClaude::builder().build();
    let upstream = served_mock(&mock).await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let c = client();
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":64,"temperature":0,"messages":[{"role":"user","content":"Say hello, status"}]}"#;
    for _ in 0..2 {
        let resp = c
            .request(messages(proxy.addr, "sk-client-status", body))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(
        mock.stats().received,
        1,
        "the second answer came from the cache"
    );

    let resp = c
        .get(
            format!("http://{}/v1/proxy/status", proxy.addr)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(status["cache"]["hits"], 1);
    assert_eq!(status["cache"]["misses"], 1);
    let quota = status["quota"].as_array().unwrap();
    let entry = quota
        .iter()
        .find(|q| q["group"] == "claude-haiku-4-5")
        .expect("the group is on the status page");
    assert!(entry["key_id"].as_str().unwrap().starts_with("k-"));
    assert!(
        entry["requests"]["limit"].as_u64().unwrap() > 0,
        "limits learned from headers"
    );
    assert!(
        !String::from_utf8_lossy(&bytes).contains("sk-client-status"),
        "no key in clear"
    );

    let resp = c
        .get(format!("http://{}/metrics", proxy.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("tower_claude_requests_total"), "{text}");
    assert!(
        text.contains(r#"tower_claude_cache_requests_total{result="hit"}"#)
            || text.contains("tower_claude_cache_requests_total{"),
        "{text}"
    );
    assert!(text.contains("tower_claude_quota_remaining{"), "{text}");
    assert!(!text.contains("sk-client-status"));
    proxy.stop().await;
}

/// Issue 18, bug 6: `/metrics` counted every successful JSON answer `outcome="cancelled"` and
/// none of its tokens (hyper stops polling a body once `is_end_stream()` is true, and the
/// metrics body finished only at the `None` it never saw).
#[tokio::test]
async fn metrics_count_json_answers_as_successes_with_their_tokens() {
    let mock = MockClaude::builder().build();
    let upstream = served_mock(&mock).await;
    let cli = Cli {
        cache: Some(false),
        ..cli_for(format!("http://{upstream}"))
    };
    let proxy = start(cli, &[]).await;
    let c = client();
    // A model no other test of this file uses: the recorder is global to the process.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello, metrics"}]}"#;
    for _ in 0..3 {
        let resp = c
            .request(messages(proxy.addr, "sk-client-metrics", body))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    let resp = c
        .get(format!("http://{}/metrics", proxy.addr).parse().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let value = |prefix: &str, must: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains("claude-sonnet-4-5"))
            .filter(|l| must.iter().all(|m| l.contains(m)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let success = value(
        "tower_claude_requests_total{",
        &[r#"status="200""#, r#"outcome="success""#],
    );
    let cancelled = value(
        "tower_claude_requests_total{",
        &[r#"status="200""#, r#"outcome="cancelled""#],
    );
    assert_eq!(success, 3.0, "{text}");
    assert_eq!(cancelled, 0.0, "{text}");
    assert!(
        value("tower_claude_output_tokens_total{", &[]) > 0.0,
        "{text}"
    );
    assert!(
        value("tower_claude_input_tokens_total{", &[]) > 0.0,
        "{text}"
    );
    proxy.stop().await;
}

/// The cache's secret (issue 13, pv13) over real HTTP: a disk cache keeps its own secret in
/// the file, so a restarted proxy hits what the last one stored; `--cache-secret` (and its
/// environment variable) replaces it, so entries stored under one secret are misses under
/// the other, and hits again under the same one; a secret that is not 64 hex digits is a
/// configuration error that does not repeat the value.
#[tokio::test]
async fn the_cache_secret_flag_keys_the_disk_cache() {
    let mock = MockClaude::builder().build();
    let upstream = served_mock(&mock).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.redb");
    let secret = "5e".repeat(32);
    let cli = |secret: Option<&str>| Cli {
        upstream: Some(format!("http://{upstream}")),
        cache_mode: Some("all".into()),
        cache_path: Some(path.display().to_string()),
        cache_secret: secret.map(str::to_owned),
        ..Cli::default()
    };
    // One request per proxy process; the proxy flushes its write-behind queue on stop.
    let once = async |cli: Cli, env: &[(&str, &str)]| {
        let proxy = start(cli, env).await;
        let resp = client()
            .request(messages(proxy.addr, "sk-client-1", HELLO))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let cache = resp.headers()["x-tower-claude-cache"]
            .to_str()
            .unwrap()
            .to_owned();
        resp.into_body().collect().await.unwrap();
        proxy.stop().await;
        cache
    };
    assert_eq!(once(cli(None), &[]).await, "miss");
    assert_eq!(once(cli(None), &[]).await, "hit", "the file's own secret");
    assert_eq!(
        once(cli(Some(&secret)), &[]).await,
        "miss",
        "another secret"
    );
    assert_eq!(once(cli(Some(&secret)), &[]).await, "hit");
    let env = [("CLAUDE_PROXY_CACHE_SECRET", secret.as_str())];
    assert_eq!(
        once(cli(None), &env).await,
        "hit",
        "the same secret from the environment"
    );
    assert_eq!(
        once(cli(None), &[]).await,
        "hit",
        "the file's own secret again"
    );
    assert_eq!(mock.stats().received, 2);

    let typo = format!("{}zz", &secret[..62]);
    let err = tower_claude::proxy::ProxyConfig::resolve(cli(Some(&typo)), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("64 hexadecimal digits"), "{err}");
    assert!(
        !err.contains(&secret[..62]),
        "the value is not repeated: {err}"
    );
}

/// A loopback upstream that answers every request with a Messages answer and sends the
/// request heads it read on `heads`.
async fn recording_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    recording_upstream_with("").await
}

/// [`recording_upstream`], its answers carrying `extra` (header lines, each ending in `\r\n`).
async fn recording_upstream_with(
    extra: &'static str,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}"#;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() < end + 4 + length {
                        continue;
                    }
                    buf.drain(..end + 4 + length);
                    let _ = tx.send(head);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{ANSWER}",
                        ANSWER.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn the_upstream_gets_its_own_host_and_never_the_clients() {
    let (upstream, mut heads) = recording_upstream().await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    for _ in 0..2 {
        let mut req = messages(proxy.addr, "sk-client-1", HELLO);
        req.headers_mut()
            .insert(http::header::HOST, "evil.example".parse().unwrap());
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        let head = heads.recv().await.unwrap();
        let hosts: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("host:"))
            .map(str::trim)
            .collect();
        assert_eq!(hosts, [upstream.to_string()], "{head}");
        assert!(head.starts_with("post /v1/messages http/1.1"), "{head}");
    }
    proxy.stop().await;
}

/// Hop-by-hop headers, and the headers a `connection` header names (RFC 9110 section 7.6.1),
/// go neither upstream nor back to the client; the request's length arrives as sent.
#[tokio::test]
async fn hop_by_hop_headers_and_those_connection_names_are_never_forwarded() {
    let (upstream, mut heads) = recording_upstream_with(
        "connection: keep-alive, X-Up-Hop\r\nx-up-hop: 1\r\nkeep-alive: timeout=5\r\nx-up-kept: 2\r\n",
    )
    .await;
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    for _ in 0..2 {
        let mut req = messages(proxy.addr, "sk-client-1", HELLO);
        let h = req.headers_mut();
        h.insert("connection", "keep-alive, x-hop-one".parse().unwrap());
        h.insert("x-hop-one", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic c2VjcmV0".parse().unwrap());
        h.insert("x-kept", "2".parse().unwrap());
        let resp = client().request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        for name in ["x-up-hop", "keep-alive"] {
            assert!(!resp.headers().contains_key(name), "{name} came back");
        }
        assert_eq!(resp.headers()["x-up-kept"], "2");
        resp.into_body().collect().await.unwrap();
        let head = heads.recv().await.unwrap();
        let names: Vec<&str> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n))
            .collect();
        for name in [
            "connection",
            "x-hop-one",
            "keep-alive",
            "proxy-authorization",
        ] {
            assert!(!names.contains(&name), "{name} went upstream: {head}");
        }
        assert!(names.contains(&"x-kept"), "{head}");
        let lengths: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("content-length:"))
            .map(str::trim)
            .collect();
        assert_eq!(lengths, [HELLO.len().to_string()], "{head}");
    }
    proxy.stop().await;
}
