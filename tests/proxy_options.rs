//! Library features reached from the proxy's configuration (issue 16), each checked over real
//! loopback HTTP: adaptive (AIMD) concurrency and ramp-up, the retry budget, predictive
//! pacing, Redis fail-closed, and restoring removed keys from the keys file on SIGHUP.
#![cfg(feature = "proxy")]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::proxy::{config, serve, start};
use tokio::net::TcpListener;
use tower_claude::anthropic::{ApiError, KeyId};
use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
use tower_claude::testing::{Fault, MockClaude};

type TestClient = Client<HttpConnector, Full<Bytes>>;

const HELLO: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}"#;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn post(addr: SocketAddr, key: &str) -> (StatusCode, Bytes) {
    let req = Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(HELLO.as_bytes())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let resp = client()
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

async fn status_page(addr: SocketAddr) -> serde_json::Value {
    get_json(addr, "/v1/proxy/status").await
}

/// An upstream simulator served on loopback, and the proxy's flags pointing at it.
async fn upstream(mock: &MockClaude) -> Cli {
    let (addr, _task) = mock.serve_on_loopback().await.unwrap();
    Cli {
        upstream: Some(format!("http://{addr}")),
        cache: Some(false),
        ..Cli::default()
    }
}

#[tokio::test]
async fn by_default_no_cap_and_no_pacing() {
    let proxy = start(
        Cli {
            upstream: Some("mock".into()),
            cache: Some(false),
            ..Cli::default()
        },
        &[],
    )
    .await;
    let status = status_page(proxy.addr).await;
    assert!(status["concurrency"].is_null(), "{status}");
    assert_eq!(status["pacing"], false);
    proxy.stop().await;
}

#[tokio::test]
async fn adaptive_concurrency_starts_at_its_initial_cap_and_halves_on_a_529() {
    let mock = MockClaude::builder().build();
    mock.push_fault(Fault::Overloaded);
    let cli = Cli {
        max_in_flight: Some(16),
        ..upstream(&mock).await
    };
    let proxy = start(
        cli,
        &[
            ("CLAUDE_PROXY_ADAPTIVE_CONCURRENCY", "true"),
            ("CLAUDE_PROXY_INITIAL_IN_FLIGHT", "6"),
        ],
    )
    .await;
    let status = status_page(proxy.addr).await;
    assert_eq!(status["concurrency"]["limit"], 6, "{status}");
    assert_eq!(status["concurrency"]["adaptive"], true);
    // The 529 is retried (the caller sees 200) and shrinks the cap.
    let (code, _) = post(proxy.addr, "sk-ant-client").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_page(proxy.addr).await["concurrency"]["limit"], 3);
    proxy.stop().await;
}

#[tokio::test]
async fn a_ramp_up_starts_the_cap_low() {
    let cli = Cli {
        upstream: Some("mock".into()),
        cache: Some(false),
        max_in_flight: Some(32),
        ramp_up_from: Some(2),
        ramp_up_interval: Some("1h".into()),
        ..Cli::default()
    };
    let proxy = start(cli, &[]).await;
    let status = status_page(proxy.addr).await;
    assert_eq!(status["concurrency"]["limit"], 2, "{status}");
    assert_eq!(status["concurrency"]["adaptive"], false);
    proxy.stop().await;

    // Without a cap to ramp up to, the configuration names the problem.
    let err = ProxyConfig::resolve(
        Cli {
            ramp_up_from: Some(2),
            ..Cli::default()
        },
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert_eq!(err.field(), "--ramp-up-from");
}

/// Requests the upstream received for one request through a proxy with `env`, against an
/// upstream that is always overloaded.
async fn upstream_attempts(env: &[(&str, &str)]) -> u64 {
    let mock = MockClaude::builder().overloaded_rate(1.0).build();
    let cli = Cli {
        max_retries: Some(1),
        fallback: Some(false),
        ..upstream(&mock).await
    };
    let proxy = start(cli, env).await;
    let (code, _) = post(proxy.addr, "sk-ant-client").await;
    assert_eq!(code.as_u16(), 529);
    proxy.stop().await;
    mock.stats().received
}

#[tokio::test]
async fn the_retry_budget_bounds_retries() {
    assert_eq!(
        upstream_attempts(&[]).await,
        2,
        "one retry without a budget"
    );
    let empty_budget = [
        ("CLAUDE_PROXY_RETRY_BUDGET", "0"),
        ("CLAUDE_PROXY_RETRY_BUDGET_MIN_PER_SEC", "0"),
    ];
    assert_eq!(
        upstream_attempts(&empty_budget).await,
        1,
        "an empty budget allows no retry"
    );
}

#[tokio::test]
async fn pacing_evaluates_requests_when_on() {
    let cli = Cli {
        upstream: Some("mock".into()),
        cache: Some(false),
        pacing: Some(true),
        pacing_trigger: Some(0.9),
        ..Cli::default()
    };
    let proxy = start(cli, &[]).await;
    assert_eq!(status_page(proxy.addr).await["pacing"], true);
    // The first answer teaches the board the group's limits; from then on every request of
    // the group is evaluated by the pacing layer, which exports its state.
    for _ in 0..2 {
        let (code, _) = post(proxy.addr, "sk-ant-client").await;
        assert_eq!(code, StatusCode::OK);
    }
    let resp = client()
        .get(format!("http://{}/metrics", proxy.addr).parse().unwrap())
        .await
        .unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(r#"tower_claude_pacing_active{group="claude-haiku-4-5"} 0"#),
        "{text}"
    );
    // Answers read to their end count as successes, not as cancelled: hyper's server stops
    // at the body's `is_end_stream` without polling for its end.
    assert!(
        text.contains(r#"status="200",outcome="success"}"#),
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn redis_fail_closed_refuses_while_redis_is_down_and_fail_open_serves() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redis_url = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    for fail_closed in [false, true] {
        let cli = Cli {
            upstream: Some("mock".into()),
            cache: Some(false),
            redis_url: Some(redis_url.clone()),
            redis_fail_closed: Some(fail_closed),
            // The retry layer would retry the refusal for a minute, in case Redis returns.
            max_retries: Some(0),
            ..Cli::default()
        };
        let proxy = Proxy::connect(config(cli, &[])).await.expect("proxy");
        let proxy = serve(proxy).await;
        let (code, body) = post(proxy.addr, "sk-ant-client").await;
        if fail_closed {
            assert_ne!(code, StatusCode::OK);
            let err = ApiError::from_response(code, &body);
            assert!(err.message().contains("fail closed"), "{}", err.message());
        } else {
            assert_eq!(code, StatusCode::OK, "fail open: limited locally");
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn removed_keys_come_back_when_the_keys_file_is_reread() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# upstream keys\nsk-ant-one\nsk-ant-two\n").unwrap();
    let cli = Cli {
        upstream: Some("mock".into()),
        cache: Some(false),
        keys_file: Some(file.clone()),
        ..Cli::default()
    };
    let proxy = Proxy::new(config(cli, &[])).unwrap();
    let pool = proxy.key_pool().unwrap().clone();
    let one = KeyId::from_api_key("sk-ant-one");
    let two = KeyId::from_api_key("sk-ant-two");
    assert!(pool.remove(&one) && pool.remove(&two));
    let _sighup = proxy.reload_keys_on_sighup().unwrap();

    // The operator drops key two from the file, adds a third, and sends SIGHUP.
    std::fs::write(&file, "sk-ant-one\nsk-ant-three\n").unwrap();
    let report = proxy.reload_keys().unwrap();
    assert_eq!(report.restored, vec![one.clone()]);
    assert_eq!(report.not_in_pool, 1);
    let running = serve(proxy).await;
    let states = |status: &serde_json::Value| -> Vec<(String, String)> {
        status["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key_id"].as_str().unwrap().to_owned(),
                    k["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let status = status_page(running.addr).await;
    assert!(states(&status).contains(&(one.as_str().to_owned(), "active".into())));
    assert!(states(&status).contains(&(two.as_str().to_owned(), "removed".into())));

    // A real SIGHUP does the same: key two is back once the file lists it again.
    std::fs::write(&file, "sk-ant-one\nsk-ant-two\n").unwrap();
    support::proxy::sighup();
    let mut restored = false;
    for _ in 0..100 {
        if states(&status_page(running.addr).await)
            .contains(&(two.as_str().to_owned(), "active".into()))
        {
            restored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(restored, "SIGHUP restored key two");
    let (code, _) = post(running.addr, "ignored").await;
    assert_eq!(code, StatusCode::OK);
    running.stop().await;
}
