//! Tenants through `claude-proxy` over real loopback HTTP (issue 15): authentication by a
//! tenant's token, the cache partition per tenant, reload by SIGHUP and by the admin route, a
//! bad file refused with its field named, per-tenant numbers on the status page and in
//! `/metrics`.
#![cfg(feature = "proxy")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::proxy::{Running, config, serve, sighup};
use tower_claude::anthropic::ApiError;
use tower_claude::proxy::{Cli, Proxy};
use tower_claude::testing::MockClaude;

type TestClient = Client<HttpConnector, Full<Bytes>>;

const UPSTREAM_KEY: &str = "sk-ant-upstream-key";

const HELLO: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"temperature":0,"messages":[{"role":"user","content":"Say hello"}]}"#;

const TENANTS: &str = r#"
[[tenant]]
name = "web"
tokens = ["tok-web"]
weight = 3
admin = true
[tenant.budget]
usd_per_day = 20.0

[[tenant]]
name = "batch-jobs"
tokens = ["tok-batch"]
priority = "batch"
"#;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }

    fn error(&self) -> ApiError {
        ApiError::from_response(self.status, &self.body)
    }
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("x-api-key", token);
    }
    let resp = client()
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn hello(addr: SocketAddr, token: Option<&str>) -> Answer {
    send(addr, Method::POST, "/v1/messages", token, HELLO).await
}

async fn status(addr: SocketAddr, token: &str) -> serde_json::Value {
    let answer = send(addr, Method::GET, "/v1/proxy/status", Some(token), "").await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.json()
}

fn tenant<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["tenants"]
        .as_array()
        .expect("tenants on the status page")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("tenant {name} on the status page: {status}"))
}

/// The flags of a proxy in front of `upstream` with `tenants` as its tenants file: no response
/// cache, spend in memory.
fn flags(upstream: SocketAddr, tenants: &Path) -> Cli {
    Cli {
        upstream: Some(format!("http://{upstream}")),
        cache: Some(false),
        cache_path: Some("memory".into()),
        tenants_file: Some(tenants.to_path_buf()),
        ..Cli::default()
    }
}

/// A proxy from `cli` that holds the upstream key.
fn proxy_with_key(cli: Cli) -> Proxy {
    Proxy::new(config(cli, &[("ANTHROPIC_API_KEY", UPSTREAM_KEY)])).unwrap()
}

/// An upstream simulator that accepts only the proxy's own key, and a proxy holding that key,
/// with `tenants` as its tenants file.
async fn setup(tenants: &str, cache: bool) -> (MockClaude, Running, tempfile::TempDir, PathBuf) {
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    std::fs::write(&file, tenants).unwrap();
    let cli = Cli {
        cache: Some(cache),
        ..flags(upstream, &file)
    };
    (mock, serve(proxy_with_key(cli)).await, dir, file)
}

#[tokio::test]
async fn unknown_and_missing_tokens_are_refused_before_upstream() {
    let (mock, proxy, _dir, _) = setup(TENANTS, false).await;
    for token in [Some("tok-nobody"), None, Some(UPSTREAM_KEY)] {
        let answer = hello(proxy.addr, token).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(answer.error().error_type(), "authentication_error");
    }
    // The status page is behind the tenants' tokens too.
    let answer = send(
        proxy.addr,
        Method::GET,
        "/v1/proxy/status",
        Some("tok-nobody"),
        "",
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(mock.stats().received, 0, "nothing reached upstream");

    // A known token reaches upstream with the proxy's key instead (the simulator accepts only
    // that one), as a bearer token too.
    assert_eq!(
        hello(proxy.addr, Some("tok-web")).await.status,
        StatusCode::OK
    );
    let req = Request::post(format!("http://{}/v1/messages", proxy.addr))
        .header("authorization", "Bearer tok-batch")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(HELLO.as_bytes())))
        .unwrap();
    assert_eq!(
        client().request(req).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(mock.stats().accepted, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn each_tenant_has_its_own_cache_partition() {
    let (mock, proxy, _dir, _) = setup(TENANTS, true).await;
    let cache = |a: &Answer| {
        a.headers
            .get("x-tower-claude-cache")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let first = hello(proxy.addr, Some("tok-web")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(cache(&first).as_deref(), Some("miss"));
    let again = hello(proxy.addr, Some("tok-web")).await;
    assert_eq!(cache(&again).as_deref(), Some("hit"));
    let other = hello(proxy.addr, Some("tok-batch")).await;
    assert_eq!(
        cache(&other).as_deref(),
        Some("miss"),
        "another tenant never gets web's answer"
    );
    assert_eq!(mock.stats().received, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn status_and_metrics_show_per_tenant_numbers_and_no_tokens() {
    let (mock, proxy, _dir, _) = setup(TENANTS, false).await;
    for _ in 0..2 {
        assert_eq!(
            hello(proxy.addr, Some("tok-web")).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        hello(proxy.addr, Some("tok-batch")).await.status,
        StatusCode::OK
    );
    // A tenant that is not an admin sees its own entry only.
    let own = status(proxy.addr, "tok-batch").await;
    assert_eq!(own["tenants"].as_array().unwrap().len(), 1, "{own}");
    assert_eq!(tenant(&own, "batch-jobs")["requests"], 1);
    let page = status(proxy.addr, "tok-web").await;
    let web = tenant(&page, "web");
    assert_eq!(web["requests"], 2);
    assert_eq!(web["weight"], 3);
    assert_eq!(web["priority"], "interactive");
    assert_eq!(web["admin"], true);
    assert_eq!(web["budget"]["usd_per_day"], 20.0);
    assert!(web["input_tokens"].as_u64().unwrap() > 0, "{web}");
    assert!(web["output_tokens"].as_u64().unwrap() > 0, "{web}");
    let batch = tenant(&page, "batch-jobs");
    assert_eq!(batch["requests"], 1);
    // Tokens are counted once, as the upstream served them (no cache here, no prompt cache).
    let served = mock.stats();
    let sum = |field: &str| web[field].as_u64().unwrap() + batch[field].as_u64().unwrap();
    assert_eq!(
        sum("output_tokens"),
        served.output_tokens.values().sum::<u64>()
    );
    assert_eq!(
        sum("input_tokens"),
        served.input_tokens.values().sum::<u64>()
    );
    assert_eq!(batch["priority"], "batch");
    assert!(
        !page.to_string().contains("tok-"),
        "no token on the status page"
    );

    let metrics = send(proxy.addr, Method::GET, "/metrics", None, "").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("tower_claude_tenant_requests_total{tenant=\"web\"} 2\n"),
        "{text}"
    );
    assert!(text.contains("tower_claude_tenant_requests_total{tenant=\"batch-jobs\"} 1\n"));
    assert!(
        text.contains("tower_claude_tenant_weight{tenant=\"web\",priority=\"interactive\"} 3\n")
    );
    assert!(text.contains("tower_claude_tenant_budget_usd{tenant=\"web\",period=\"day\"} 20\n"));
    let output = format!(
        "tower_claude_tenant_output_tokens_total{{tenant=\"web\"}} {}\n",
        web["output_tokens"]
    );
    assert!(text.contains(&output), "{output} in\n{text}");
    assert!(!text.contains("tok-"), "no token in the metrics");
    proxy.stop().await;
}

const RELOADED: &str = r#"
[[tenant]]
name = "web"
tokens = ["tok-web"]
weight = 5
admin = true

[[tenant]]
name = "ml"
tokens = ["tok-ml"]
"#;

async fn reload_route(addr: SocketAddr, token: &str) -> Answer {
    send(addr, Method::POST, "/v1/proxy/reload", Some(token), "").await
}

#[tokio::test]
async fn the_admin_route_reloads_and_only_for_an_admin() {
    let (mock, proxy, _dir, file) = setup(TENANTS, false).await;
    assert_eq!(
        hello(proxy.addr, Some("tok-web")).await.status,
        StatusCode::OK
    );
    std::fs::write(&file, RELOADED).unwrap();

    let refused = reload_route(proxy.addr, "tok-batch").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // Another method is not forwarded upstream either.
    let received = mock.stats().received;
    let other = send(
        proxy.addr,
        Method::GET,
        "/v1/proxy/reload",
        Some("tok-web"),
        "",
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(mock.stats().received, received);
    assert_eq!(refused.error().error_type(), "permission_error");
    assert_eq!(
        hello(proxy.addr, Some("tok-ml")).await.status,
        StatusCode::UNAUTHORIZED
    );

    let done = reload_route(proxy.addr, "tok-web").await;
    assert_eq!(
        done.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&done.body)
    );
    let report = done.json();
    assert_eq!(report["tenants"]["added"], serde_json::json!(["ml"]));
    assert_eq!(
        report["tenants"]["removed"],
        serde_json::json!(["batch-jobs"])
    );
    assert_eq!(report["tenants"]["changed"], serde_json::json!(["web"]));
    assert_eq!(
        hello(proxy.addr, Some("tok-ml")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        hello(proxy.addr, Some("tok-batch")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let page = status(proxy.addr, "tok-web").await;
    let web = tenant(&page, "web");
    assert_eq!(web["weight"], 5);
    assert_eq!(web["requests"], 1, "counters survive a reload");
    assert!(
        page["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] != "batch-jobs")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_file_is_refused_with_its_field_named_and_the_old_table_serves() {
    let (_mock, proxy, _dir, file) = setup(TENANTS, false).await;
    std::fs::write(
        &file,
        TENANTS.replace("priority = \"batch\"", "priority = \"batch\"\nweight = 0"),
    )
    .unwrap();
    let refused = reload_route(proxy.addr, "tok-web").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let err = refused.error();
    assert_eq!(err.error_type(), "invalid_request_error");
    assert!(
        err.message()
            .contains(r#"tenant[1] "batch-jobs": weight: must be at least 1"#),
        "{}",
        err.message()
    );
    std::fs::write(&file, TENANTS.replace("weight = 3", "wieght = 3")).unwrap();
    let err = reload_route(proxy.addr, "tok-web").await.error();
    assert!(err.message().contains("wieght"), "{}", err.message());
    assert!(
        err.message().contains(r#"tenant[0] "web""#),
        "{}",
        err.message()
    );
    // The running table is kept.
    assert_eq!(
        hello(proxy.addr, Some("tok-batch")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        tenant(&status(proxy.addr, "tok-web").await, "web")["weight"],
        3
    );
    proxy.stop().await;
}

/// Polls until `token` gets `expected` (SIGHUP is handled by a task, a moment later).
async fn until_status(addr: SocketAddr, token: &str, expected: StatusCode) -> bool {
    for _ in 0..200 {
        if hello(addr, Some(token)).await.status == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_tenants_file_and_refuses_a_bad_one() {
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    let keys = dir.path().join("keys");
    write(&tenants, TENANTS);
    write(&keys, &format!("{UPSTREAM_KEY}\n"));
    let cli = Cli {
        keys_file: Some(keys),
        ..flags(upstream, &tenants)
    };
    let proxy = Proxy::new(config(cli, &[])).unwrap();
    let _sighup = proxy.reload_on_sighup().unwrap();
    let running = serve(proxy).await;
    assert_eq!(
        hello(running.addr, Some("tok-batch")).await.status,
        StatusCode::OK
    );

    // A bad file: the signal is logged and refused, the old table keeps serving.
    write(
        &tenants,
        &TENANTS.replace("priority = \"batch\"", "priority = \"urgent\""),
    );
    sighup();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        hello(running.addr, Some("tok-batch")).await.status,
        StatusCode::OK
    );

    // A good one: one signal re-reads it (and the keys file).
    write(&tenants, RELOADED);
    sighup();
    assert!(
        until_status(running.addr, "tok-ml", StatusCode::OK).await,
        "tok-ml admitted"
    );
    assert_eq!(
        hello(running.addr, Some("tok-batch")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        mock.stats().by_status.get(&401),
        None,
        "no tenant token went upstream"
    );
    running.stop().await;
}

const BUDGETS: &str = r#"
[[tenant]]
name = "tiny"
tokens = ["tok-tiny"]
[tenant.budget]
usd_per_day = 0.000001

[[tenant]]
name = "web"
tokens = ["tok-web"]
admin = true
"#;

/// A proxy in front of `upstream` whose tenants' spend is kept in `spend` (a redb file).
async fn budget_proxy(upstream: SocketAddr, tenants: &Path, spend: &Path) -> Running {
    let cli = Cli {
        spend_path: Some(spend.to_str().unwrap().to_owned()),
        ..flags(upstream, tenants)
    };
    serve(proxy_with_key(cli)).await
}

#[tokio::test]
async fn a_tenant_at_its_budget_gets_a_429_until_the_period_ends_and_a_restart_keeps_it() {
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    let spend = dir.path().join("state").join("spend.redb");
    write(&tenants, BUDGETS);
    let proxy = budget_proxy(upstream, &tenants, &spend).await;

    // The first request fits (nothing spent yet) and costs more than the budget.
    assert_eq!(
        hello(proxy.addr, Some("tok-tiny")).await.status,
        StatusCode::OK
    );
    let refused = hello(proxy.addr, Some("tok-tiny")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let err = refused.error();
    assert_eq!(err.error_type(), "rate_limit_error");
    assert!(err.message().contains("tiny"), "{}", err.message());
    assert!(err.message().contains("budget"), "{}", err.message());
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.headers["x-should-retry"], "false");
    // Another tenant is not affected.
    assert_eq!(
        hello(proxy.addr, Some("tok-web")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        mock.stats().accepted,
        2,
        "the refused request never went upstream"
    );

    let page = status(proxy.addr, "tok-web").await;
    let tiny = tenant(&page, "tiny");
    assert_eq!(tiny["refusals"], 1);
    assert_eq!(tiny["requests"], 2);
    let cost = tiny["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.000001, "{tiny}");
    assert_eq!(tiny["budget"]["spent_today_usd"].as_f64().unwrap(), cost);
    assert!(
        tiny["budget"]["day_used"].as_f64().unwrap() >= 1.0,
        "{tiny}"
    );
    assert!(tenant(&page, "web")["cost_usd"].as_f64().unwrap() > 0.0);
    let metrics = send(proxy.addr, Method::GET, "/metrics", None, "").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("tower_claude_tenant_refusals_total{tenant=\"tiny\"} 1\n"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "tower_claude_tenant_cost_usd_total{{tenant=\"tiny\"}} {cost}\n"
    )));
    proxy.stop().await;

    // The spend is in the redb file: a new process refuses the tenant at once.
    let proxy = budget_proxy(upstream, &tenants, &spend).await;
    assert_eq!(
        hello(proxy.addr, Some("tok-tiny")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let page = status(proxy.addr, "tok-web").await;
    assert_eq!(
        tenant(&page, "tiny")["budget"]["spent_today_usd"]
            .as_f64()
            .unwrap(),
        cost
    );
    assert_eq!(
        tenant(&page, "tiny")["cost_usd"],
        0.0,
        "counters start again, spend does not"
    );
    assert_eq!(mock.stats().accepted, 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_tenant_held_to_its_own_limit_does_not_hold_back_another() {
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    write(
        &tenants,
        "[[tenant]]\nname = \"intern\"\ntokens = [\"tok-intern\"]\n\
         [tenant.limits.\"claude-haiku-4-5\"]\nrpm = 1\nitpm = 100000\notpm = 10000\n\
         [[tenant]]\nname = \"web\"\ntokens = [\"tok-web\"]\nadmin = true\n",
    );
    let cli = Cli {
        deadline: Some("2s".into()),
        ..flags(upstream, &tenants)
    };
    let proxy = serve(proxy_with_key(cli)).await;
    assert_eq!(
        hello(proxy.addr, Some("tok-intern")).await.status,
        StatusCode::OK
    );
    // One request a minute: the second would wait about a minute, past its 2 s deadline.
    let held = hello(proxy.addr, Some("tok-intern")).await;
    assert_eq!(
        held.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&held.body)
    );
    assert_eq!(held.error().error_type(), "rate_limit_error");
    for _ in 0..3 {
        assert_eq!(
            hello(proxy.addr, Some("tok-web")).await.status,
            StatusCode::OK
        );
    }
    let page = status(proxy.addr, "tok-web").await;
    assert_eq!(tenant(&page, "intern")["refusals"], 1);
    assert_eq!(
        tenant(&page, "intern")["limits"]["claude-haiku-4-5"]["rpm"],
        1
    );
    assert_eq!(tenant(&page, "web")["refusals"], 0);
    assert_eq!(mock.stats().accepted, 4);
    proxy.stop().await;
}

/// A simulated upstream and two proxy nodes sharing one Redis, with the given tenants file
/// (and deadline); the upstream task and the directory live as long as the caller keeps them.
#[cfg(feature = "redis")]
async fn two_redis_nodes(
    redis: &support::redis_server::RedisServer,
    tenants_toml: &str,
    deadline: Option<&str>,
) -> (
    MockClaude,
    tokio::task::JoinHandle<std::io::Result<()>>,
    tempfile::TempDir,
    Vec<Running>,
) {
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    write(&tenants, tenants_toml);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let cli = Cli {
            redis_url: Some(redis.url()),
            deadline: deadline.map(Into::into),
            ..flags(upstream, &tenants)
        };
        let proxy = Proxy::connect(config(cli, &[("ANTHROPIC_API_KEY", UPSTREAM_KEY)]))
            .await
            .unwrap();
        nodes.push(serve(proxy).await);
    }
    (mock, task, dir, nodes)
}

/// Two proxy nodes sharing Redis share each tenant's spend: what one node settled stops the
/// tenant on the other.
#[cfg(feature = "redis")]
#[tokio::test]
async fn two_nodes_sharing_redis_share_a_tenants_spend() {
    let Some(redis) = support::redis_server::RedisServer::start() else {
        return;
    };
    let (mock, _upstream, _dir, nodes) = two_redis_nodes(&redis, BUDGETS, None).await;
    assert_eq!(
        hello(nodes[0].addr, Some("tok-tiny")).await.status,
        StatusCode::OK
    );
    let refused = hello(nodes[1].addr, Some("tok-tiny")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.error().message().contains("budget"));
    let page = status(nodes[1].addr, "tok-web").await;
    let tiny = tenant(&page, "tiny");
    assert_eq!(tiny["cost_usd"], 0.0, "node 1 spent nothing itself");
    assert!(
        tiny["budget"]["spent_today_usd"].as_f64().unwrap() > 0.0,
        "{tiny}"
    );
    assert_eq!(mock.stats().accepted, 1);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_request_in_flight_finishes_as_the_tenant_it_was_admitted_as() {
    let mock = MockClaude::builder()
        .api_keys([UPSTREAM_KEY])
        .latency(Duration::from_millis(400), Duration::ZERO)
        .build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    write(&tenants, TENANTS);
    let proxy = proxy_with_key(flags(upstream, &tenants));
    let table = proxy.tenants().unwrap();
    let running = serve(proxy).await;
    let addr = running.addr;
    let in_flight = tokio::spawn(async move { hello(addr, Some("tok-batch")).await });
    while mock.stats().received == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // batch-jobs leaves the file while its request is upstream.
    write(&tenants, RELOADED);
    let report = reload_route(addr, "tok-web").await;
    assert_eq!(
        report.json()["tenants"]["removed"],
        serde_json::json!(["batch-jobs"])
    );
    assert_eq!(
        hello(addr, Some("tok-batch")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "not dropped by the reload");
    // It was counted for the tenant it was admitted as (the old table's value).
    let batch = table.get("batch-jobs").unwrap().stats();
    assert_eq!(batch.requests(), 1);
    assert!(
        batch.output_tokens() > 0,
        "settled after the reload, to its own tenant"
    );
    running.stop().await;
}

/// The official Python SDK (`anthropic`, with its default 2 retries) against a tenant at its
/// budget: it reads `x-should-retry: false`, does not retry, and raises `RateLimitError` at
/// once with the proxy's message. Skipped (saying why) without `python3` and the `anthropic`
/// module, unless `CI` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_stops_at_once_at_a_budget() {
    const SCRIPT: &str = r#"
import os, sys, time
try:
    import anthropic
except ImportError:
    sys.exit(77)
client = anthropic.Anthropic(base_url=os.environ["PROXY"], api_key="tok-tiny")
ask = lambda: client.messages.create(model="claude-haiku-4-5", max_tokens=64,
    messages=[{"role": "user", "content": "Say hello"}])
ask()
start = time.monotonic()
try:
    ask()
    print("answered")
except anthropic.RateLimitError as e:
    print("refused", round(time.monotonic() - start, 2), e.response.headers.get("retry-after"))
    print(e.message)
"#;
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    write(&tenants, BUDGETS);
    let proxy = serve(proxy_with_key(flags(upstream, &tenants))).await;
    let mut python = tokio::process::Command::new("python3");
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        python.env_remove(var);
    }
    let run = python
        .args(["-c", SCRIPT])
        .env("PROXY", format!("http://{}", proxy.addr))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output();
    let skip = |why: &str| {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot run the Python SDK test: {why}"
        );
        eprintln!("skipped: {why}");
    };
    let out = match tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
    {
        Ok(out) => out,
        Err(e) => return skip(&format!("python3 cannot be run ({e})")),
    };
    if out.status.code() == Some(77) {
        return skip("the `anthropic` Python module is missing");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(first[0], "refused", "{stdout}");
    let waited: f64 = first[1].parse().unwrap();
    assert!(waited < 1.0, "the SDK did not wait: {waited} s");
    assert!(first[2].parse::<u64>().unwrap() >= 1, "{stdout}");
    assert!(lines.next().unwrap().contains("budget"), "{stdout}");
    // Two requests reached the proxy: the SDK did not retry the refusal.
    let tiny = tenant(&status(proxy.addr, "tok-web").await, "tiny").clone();
    assert_eq!(tiny["requests"], 2, "{tiny}");
    assert_eq!(tiny["refusals"], 1, "{tiny}");
    proxy.stop().await;
}

/// Two proxy nodes sharing Redis hold a tenant to its own limits together: one request a
/// minute through either node, not one per node.
#[cfg(feature = "redis")]
#[tokio::test]
async fn two_nodes_sharing_redis_share_a_tenants_own_limits() {
    let Some(redis) = support::redis_server::RedisServer::start() else {
        return;
    };
    let (mock, _upstream, _dir, nodes) = two_redis_nodes(
        &redis,
        "[[tenant]]\nname = \"intern\"\ntokens = [\"tok-intern\"]\n\
         [tenant.limits.\"claude-haiku-4-5\"]\nrpm = 1\nitpm = 100000\notpm = 10000\n",
        Some("2s"),
    )
    .await;
    assert_eq!(
        hello(nodes[0].addr, Some("tok-intern")).await.status,
        StatusCode::OK
    );
    let held = hello(nodes[1].addr, Some("tok-intern")).await;
    assert_eq!(
        held.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&held.body)
    );
    assert_eq!(mock.stats().accepted, 1);
    for node in nodes {
        node.stop().await;
    }
}
