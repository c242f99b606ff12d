//! Service-level tests of `MetricsLayer` against MockClaude, read back through the
//! Prometheus exporter.
#![cfg(all(feature = "testing", feature = "metrics"))]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_claude::anthropic::{KeyId, ModelCatalog, RateLimitGroup};
use tower_claude::body::RequestBody;
use tower_claude::metrics::alerts::Alerts;
use tower_claude::metrics::forecast::Forecaster;
use tower_claude::metrics::pacing::PacingLayer;
use tower_claude::metrics::{MetricsLayer, names, prometheus};
use tower_claude::quota::{Limits, QuotaBoard};
use tower_claude::rate_limit::RateLimitLayer;
use tower_claude::retry::RetryLayer;
use tower_claude::testing::{Fault, MockClaude, MockLimits};

const MODEL: &str = "claude-sonnet-4-6";
const KEY: &str = "sk-ant-metrics-test";

fn body_for(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":300,"stream":{stream},"messages":[{{"role":"user","content":"Count to ten."}}]}}"#
    )
}

fn request(model: &str, stream: bool) -> Request<RequestBody> {
    Request::post("/v1/messages")
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .body(RequestBody::from(body_for(model, stream)))
        .unwrap()
}

/// The rendered exposition as `series -> value` (`name{labels}` exactly as rendered).
fn scrape(handle: &prometheus::PrometheusHandle) -> BTreeMap<String, f64> {
    prometheus::render(handle)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

fn group() -> String {
    ModelCatalog::default().group(MODEL).as_str().to_owned()
}

#[tokio::test(start_paused = true)]
async fn json_and_stream_tokens_match_the_simulator() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockClaude::builder()
        .output_tokens(42)
        .latency(Duration::from_millis(100), Duration::from_millis(1))
        .build();
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .service(mock.clone());
    for stream in [false, false, false, true, true] {
        let response = svc.clone().oneshot(request(MODEL, stream)).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    let m = scrape(&handle);
    let stats = mock.stats();
    let g = group();
    assert_eq!(
        get(
            &m,
            &format!(
                r#"tower_claude_requests_total{{model="{MODEL}",group="{g}",status="200",outcome="success"}}"#
            )
        ),
        5.0
    );
    let labels = format!(r#"{{model="{MODEL}",group="{g}"}}"#);
    assert_eq!(
        get(&m, &format!("tower_claude_output_tokens_total{labels}")),
        5.0 * 42.0
    );
    assert_eq!(
        get(&m, &format!("tower_claude_output_tokens_total{labels}")),
        stats.output_tokens[&g] as f64
    );
    assert_eq!(
        get(&m, &format!("tower_claude_input_tokens_total{labels}")),
        stats.input_tokens[&g] as f64
    );
    assert_eq!(
        get(
            &m,
            &format!(
                r#"tower_claude_request_duration_seconds_count{{model="{MODEL}",outcome="success"}}"#
            )
        ),
        5.0
    );
    // 100 ms + 42 tokens * 1 ms each, at least.
    let sum = get(
        &m,
        &format!(
            r#"tower_claude_request_duration_seconds_sum{{model="{MODEL}",outcome="success"}}"#
        ),
    );
    assert!(sum >= 5.0 * 0.142 - 1e-9, "{sum}");
    assert_eq!(get(&m, "tower_claude_in_flight_requests"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn statuses_and_outcomes() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockClaude::builder().build();
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .service(mock.clone());
    mock.push_fault(Fault::RateLimited {
        retry_after: Duration::from_secs(3),
    });
    mock.push_fault(Fault::Overloaded);
    mock.push_fault(Fault::ServerError);
    mock.push_fault(Fault::Status(400));
    for _ in 0..4 {
        // Error bodies are not read: the status decides.
        let response = svc.clone().oneshot(request(MODEL, false)).await.unwrap();
        drop(response);
    }
    mock.push_fault(Fault::MidStreamError);
    let response = svc.clone().oneshot(request(MODEL, true)).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();

    let m = scrape(&handle);
    let g = group();
    for (status, outcome) in [
        ("429", "rate_limited"),
        ("529", "overloaded"),
        ("500", "server_error"),
        ("400", "client_error"),
        ("200", "stream_error"),
    ] {
        let series = format!(
            r#"tower_claude_requests_total{{model="{MODEL}",group="{g}",status="{status}",outcome="{outcome}"}}"#
        );
        assert_eq!(get(&m, &series), 1.0, "{series}");
    }
    assert_eq!(get(&m, "tower_claude_in_flight_requests"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn dropped_stream_is_cancelled_and_counts_tokens_so_far() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockClaude::builder()
        .output_tokens(200)
        .latency(Duration::from_millis(50), Duration::from_millis(10))
        .build();
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .service(mock);
    let response = svc.oneshot(request(MODEL, true)).await.unwrap();
    let mut body = response.into_body();
    // message_start carries the input tokens.
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    assert_eq!(
        get(&scrape(&handle), "tower_claude_in_flight_requests"),
        1.0
    );
    drop(body);
    let m = scrape(&handle);
    let g = group();
    assert_eq!(
        get(
            &m,
            &format!(
                r#"tower_claude_requests_total{{model="{MODEL}",group="{g}",status="200",outcome="cancelled"}}"#
            )
        ),
        1.0
    );
    assert!(
        get(
            &m,
            &format!(r#"tower_claude_input_tokens_total{{model="{MODEL}",group="{g}"}}"#)
        ) > 0.0
    );
    assert_eq!(get(&m, "tower_claude_in_flight_requests"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn labels_are_bounded_and_other_calls_pass_through() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockClaude::builder().build();
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new().known_models(["my-fine-tune"]))
        .service(mock);
    for model in ["gpt-9000-secret-prompt", "claude-opus-99-x", "my-fine-tune"] {
        let response = svc.clone().oneshot(request(model, false)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let models = Request::get("/v1/models")
        .header("x-api-key", KEY)
        .body(RequestBody::empty())
        .unwrap();
    let _ = svc.clone().oneshot(models).await.unwrap();
    let m = scrape(&handle);
    let text = prometheus::render(&handle);
    assert!(!text.contains("gpt-9000"), "{text}");
    assert!(!text.contains("claude-opus-99-x"));
    assert!(!text.contains(KEY));
    let total: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tower_claude_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 3.0, "GET /v1/models is not counted");
    assert!(m.contains_key(r#"tower_claude_input_tokens_total{model="other",group="other"}"#));
    assert!(
        m.contains_key(r#"tower_claude_input_tokens_total{model="other",group="claude-opus"}"#)
    );
    assert!(m.contains_key(
        r#"tower_claude_input_tokens_total{model="my-fine-tune",group="my-fine-tune"}"#
    ));
}

/// Marks responses as the cache and fallback layers do (those layers are tested elsewhere).
fn mark<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    headers.insert("x-tower-claude-cache", "miss".parse().unwrap());
    headers.insert("x-tower-claude-model", "claude-haiku-4-5".parse().unwrap());
    response
}

#[tokio::test(start_paused = true)]
async fn full_stack_retries_queue_quota_fallback_cache_and_every_name_renders() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    prometheus_describe();
    let group = RateLimitGroup::new(group());
    let limits = Limits::new(5, 100_000, 20_000);
    let mock = MockClaude::builder()
        .limits(group.as_str(), MockLimits::new(5, 100_000, 20_000))
        .build();
    let board = QuotaBoard::new();
    let forecaster =
        Forecaster::with_config(Duration::from_secs(1), Duration::from_secs(5), 0.5, 0.3);
    let alerts = Alerts::builder().threshold(0.5).build();
    let svc = ServiceBuilder::new()
        .layer(
            MetricsLayer::new()
                .board(board.clone())
                .alerts(alerts)
                .forecaster(forecaster.clone())
                .quota_refresh(Duration::ZERO),
        )
        .map_response(mark)
        .layer(
            PacingLayer::new(forecaster)
                .limits(group.clone(), limits)
                .trigger(0.01),
        )
        .layer(RetryLayer::new().max_attempts(3))
        .layer(
            RateLimitLayer::new()
                .board(board.clone())
                .limits(group.clone(), limits),
        )
        .service(mock.clone());
    mock.push_fault(Fault::Overloaded);
    let mut handles = Vec::new();
    for _ in 0..7 {
        let mut svc = svc.clone();
        handles.push(tokio::spawn(async move {
            let response = svc
                .ready()
                .await
                .unwrap()
                .call(request(MODEL, false))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for h in handles {
        h.await.unwrap();
    }
    let m = scrape(&handle);
    let key = KeyId::from_api_key(KEY);
    let g = group.as_str();
    assert_eq!(
        get(&m, r#"tower_claude_retries_total{reason="overloaded"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"tower_claude_cache_requests_total{cache="miss"}"#),
        7.0
    );
    assert_eq!(
        get(
            &m,
            &format!(r#"tower_claude_fallbacks_total{{from="{MODEL}",to="claude-haiku-4-5"}}"#)
        ),
        7.0
    );
    // 7 requests against 5 RPM: some waited for quota. Served by the fallback model, they are
    // reported under its group.
    let served = r#"group="claude-haiku-4-5""#;
    let waited = get(
        &m,
        &format!("tower_claude_queue_wait_seconds_sum{{{served}}}"),
    );
    assert!(waited > 1.0, "{waited}");
    assert_eq!(
        get(
            &m,
            &format!("tower_claude_queue_wait_seconds_count{{{served}}}")
        ),
        7.0
    );
    let quota = |name: &str| {
        get(
            &m,
            &format!(r#"{name}{{key="{key}",group="{g}",bucket="requests"}}"#),
        )
    };
    assert_eq!(quota("tower_claude_quota_limit"), 5.0);
    assert!(quota("tower_claude_quota_remaining") < 5.0);
    assert!(quota("tower_claude_quota_utilisation") > 0.0);
    assert_eq!(get(&m, r#"tower_claude_alerts_total{state="firing"}"#), 1.0);
    let text = prometheus::render(&handle);
    assert!(!text.contains(KEY));
    // Every documented metric appears (alert deliveries need a webhook: tests/alerts.rs).
    for def in names::METRICS {
        // Not in this scenario: alert deliveries (tests/alerts.rs), key pools and the Redis
        // board (the two tests below), the cache's writes (tests/cache.rs, store_failures);
        // per-tenant metrics are rendered by the proxy from its tenants' counters
        // (`prometheus::render_tenants`, tests/proxy_tenants.rs).
        if def.name.starts_with("tower_claude_tenant_") {
            continue;
        }
        if [
            names::ALERT_DELIVERIES_TOTAL,
            names::KEYS_REMOVED_TOTAL,
            names::QUOTA_REDIS_OUTAGES_TOTAL,
            names::CACHE_WRITES_TOTAL,
            // A failing spend store: tests/tenant_budget.rs.
            names::SPEND_STORE_ERRORS_TOTAL,
        ]
        .contains(&def.name)
        {
            continue;
        }
        assert!(
            text.contains(&format!("# TYPE {} ", def.name)),
            "{} missing from\n{text}",
            def.name
        );
    }
}

fn prometheus_describe() {
    names::describe();
}

/// A minimal subscriber that keeps the fields of `claude_request` spans.
#[derive(Default, Clone)]
struct Spans(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct Visitor<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl tracing::Subscriber for Spans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut spans = self.0.lock().unwrap();
        let mut fields = BTreeMap::new();
        fields.insert("name".to_owned(), span.metadata().name().to_owned());
        span.record(&mut Visitor(&mut fields));
        spans.push(fields);
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.0.lock().unwrap();
        if let Some(fields) = spans.get_mut(span.into_u64() as usize - 1) {
            values.record(&mut Visitor(fields));
        }
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn cache_hits_count_no_tokens() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let hit = |mut r: Response<_>| {
        r.headers_mut()
            .insert("x-tower-claude-cache", "hit".parse().unwrap());
        r
    };
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .map_response(hit)
        .service(MockClaude::builder().build());
    let response = svc.oneshot(request(MODEL, false)).await.unwrap();
    response.into_body().collect().await.unwrap();
    let m = scrape(&handle);
    assert_eq!(
        get(&m, r#"tower_claude_cache_requests_total{cache="hit"}"#),
        1.0
    );
    assert!(
        !m.keys()
            .any(|k| k.starts_with("tower_claude_output_tokens_total")),
        "{m:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_span_per_request_with_key_group_model_attempts_cache() {
    // A global subscriber: thread-local ones race with tracing's callsite interest cache
    // while other tests run in parallel.
    static SPANS: std::sync::OnceLock<Spans> = std::sync::OnceLock::new();
    let spans = SPANS.get_or_init(|| {
        let spans = Spans::default();
        tracing::subscriber::set_global_default(spans.clone()).unwrap();
        spans
    });
    const SPAN_KEY: &str = "sk-ant-span-test";
    let mock = MockClaude::builder().build();
    mock.push_fault(Fault::Overloaded);
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .map_response(mark)
        .layer(RetryLayer::new().max_attempts(3))
        .service(mock);
    let mut req = request(MODEL, false);
    req.headers_mut()
        .insert("x-api-key", SPAN_KEY.parse().unwrap());
    let response = svc.oneshot(req).await.unwrap();
    response.into_body().collect().await.unwrap();
    let key = KeyId::from_api_key(SPAN_KEY);
    let spans = spans.0.lock().unwrap();
    let span = spans
        .iter()
        .find(|s| {
            s.get("name").map(String::as_str) == Some("claude_request")
                && s.get("key").map(String::as_str) == Some(key.as_str())
        })
        .expect("a claude_request span");
    assert_eq!(span["group"], group());
    assert_eq!(span["model"], MODEL);
    assert_eq!(span["attempts"], "2");
    assert_eq!(span["cache"], "miss");
    assert_eq!(span["status"], "200");
    assert_eq!(span["served_model"], "claude-haiku-4-5");
    assert!(!format!("{span:?}").contains(SPAN_KEY));
}

/// Metric names (`tower_claude_*` identifiers) used in a PromQL expression.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tower_claude_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}

#[test]
fn grafana_dashboard_is_valid_and_uses_only_defined_metrics() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana/tower-claude.json"
    ))
    .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for field in [
        "title",
        "uid",
        "schemaVersion",
        "panels",
        "time",
        "templating",
    ] {
        assert!(dash.get(field).is_some(), "dashboard field {field} missing");
    }
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    assert!(dash["uid"].as_str().unwrap().len() <= 40);
    let defined: std::collections::HashSet<String> = names::METRICS
        .iter()
        .flat_map(names::rendered_names)
        .collect();
    let mut ids = std::collections::HashSet::new();
    let mut exprs = 0;
    let mut used = std::collections::HashSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate panel id"
        );
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(panel["type"].as_str().is_some());
        let pos = &panel["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(
                pos[k].as_u64().is_some(),
                "gridPos.{k} of {}",
                panel["title"]
            );
        }
        assert!(pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24);
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for target in targets {
            assert!(target["refId"].as_str().is_some());
            let expr = target["expr"].as_str().expect("expr");
            let found = metric_names_in(expr);
            assert!(!found.is_empty(), "{expr} uses no tower-claude metric");
            for name in found {
                assert!(
                    defined.contains(&name),
                    "{name} in {expr:?} is not a defined metric"
                );
                used.insert(name);
            }
            // Balanced brackets: a cheap syntax check.
            for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
                assert_eq!(
                    expr.matches(open).count(),
                    expr.matches(close).count(),
                    "{expr}"
                );
            }
            exprs += 1;
        }
    }
    assert!(exprs >= 10);
    // The issue's panels: RPM / TPM use vs limit, status codes, 429 rate, latency, forecast.
    for name in [
        names::QUOTA_LIMIT,
        names::INPUT_TOKENS_TOTAL,
        names::OUTPUT_TOKENS_TOTAL,
        names::FORECAST_PER_MINUTE,
        "tower_claude_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(name), "{name} not on the dashboard");
    }
    assert!(text.contains(r#"status=\"429\""#));
}

#[test]
fn docs_table_lists_every_metric_and_label() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for def in names::METRICS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` ", def.name)))
            .unwrap_or_else(|| panic!("{} has no row in docs/metrics.md", def.name));
        for label in def.labels {
            assert!(
                row.contains(&format!("`{label}`")),
                "{} row lacks label {label}",
                def.name
            );
        }
    }
    assert!(doc.contains("metrics-chart.svg"));
}

#[tokio::test(start_paused = true)]
async fn background_refresh_moves_quota_gauges_without_traffic() {
    use tower_claude::quota::Cost;
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let group = RateLimitGroup::new("claude-opus-4");
    let board = QuotaBoard::builder()
        .limits(group.clone(), Limits::new(60, 30_000, 8_000))
        .build();
    let key = KeyId::named("k-batch");
    // Another layer spends 30 requests' worth of the bucket.
    let reservation = board
        .acquire(key.clone(), group.clone(), Cost::new(30, 0, 0))
        .await
        .unwrap();
    reservation.settle(Cost::new(30, 0, 0));
    let layer = MetricsLayer::new().board(board);
    let task = layer.spawn_refresh(Duration::from_secs(1));
    let series =
        r#"tower_claude_quota_remaining{key="k-batch",group="claude-opus-4",bucket="requests"}"#;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let first = get(&scrape(&handle), series);
    assert!((30.0..=32.0).contains(&first), "{first}");
    // The bucket refills at 1 request per second; the gauge follows with no request at all.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let later = get(&scrape(&handle), series);
    assert!(later >= first + 9.0, "{first} -> {later}");
    task.abort();
}

/// The real cache above the real fallback layer. A fallback answer is stored under the model
/// that produced it: once Opus answers again, the Opus request is a miss (it used to be served
/// the stored Sonnet answer as a hit, for the whole TTL); every hit names its model.
#[tokio::test(start_paused = true)]
async fn with_the_real_cache_and_fallback_layers() {
    use tower_claude::cache::CacheLayer;
    use tower_claude::fallback::FallbackLayer;
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockClaude::builder().build();
    let board = QuotaBoard::new();
    let fallback = FallbackLayer::new().board(board.clone());
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new().board(board.clone()))
        .layer(CacheLayer::memory(1 << 20).fallback(fallback.handle()))
        .layer(fallback)
        .layer(RetryLayer::new().max_attempts(2))
        .layer(RateLimitLayer::new().board(board))
        .service(mock.clone());
    let body = r#"{"model":"claude-opus-4-7","max_tokens":50,"temperature":0,"messages":[{"role":"user","content":"Name a prime."}]}"#;
    let req = || {
        Request::post("/v1/messages")
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .body(RequestBody::from(body))
            .unwrap()
    };
    // The Opus group hits its spend cap once: the fallback layer moves down the chain. Then
    // Opus answers again: its own answer, then a hit of it.
    mock.push_fault(Fault::SpendCap);
    let mut served = Vec::new();
    for _ in 0..3 {
        let response = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(response.status(), 200);
        served.push((
            response.headers()["x-tower-claude-cache"]
                .to_str()
                .unwrap()
                .to_owned(),
            response.headers()["x-tower-claude-model"]
                .to_str()
                .unwrap()
                .to_owned(),
        ));
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(served[0].0, "miss");
    assert_ne!(
        served[0].1, "claude-opus-4-7",
        "the spend cap made it fall back"
    );
    assert_eq!(served[1], ("miss".to_owned(), "claude-opus-4-7".to_owned()));
    assert_eq!(served[2], ("hit".to_owned(), "claude-opus-4-7".to_owned()));
    let m = scrape(&handle);
    assert_eq!(
        get(&m, r#"tower_claude_cache_requests_total{cache="miss"}"#),
        2.0,
        "{m:#?}"
    );
    assert_eq!(
        get(&m, r#"tower_claude_cache_requests_total{cache="hit"}"#),
        1.0
    );
    let fell_back: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with(r#"tower_claude_fallbacks_total{from="claude-opus-4-7""#))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(fell_back, 1.0, "{m:#?}");
    // Tokens counted once per upstream answer (the hit used no quota), under the serving
    // model's group.
    let out: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tower_claude_output_tokens_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(out, mock.stats().output_tokens.values().sum::<u64>() as f64);
}

/// A key pool's removals are counted by reason.
#[tokio::test(start_paused = true)]
async fn removed_keys_are_counted_by_reason() {
    use tower_claude::key_pool::KeyPoolLayer;
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // The simulator knows only the first key: the second gets a 401 and leaves the rotation.
    let mock = MockClaude::builder().api_keys(["sk-ant-good"]).build();
    let pool = KeyPoolLayer::new(["sk-ant-good", "sk-ant-revoked"]).unwrap();
    let keys = pool.handle();
    let svc = ServiceBuilder::new().layer(pool).service(mock);
    for _ in 0..3 {
        let response = svc.clone().oneshot(request(MODEL, false)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    assert!(keys.remove(&KeyId::from_api_key("sk-ant-good")));
    let m = scrape(&handle);
    for reason in ["unauthorized", "manual"] {
        assert_eq!(
            get(
                &m,
                &format!(r#"tower_claude_keys_removed_total{{reason="{reason}"}}"#)
            ),
            1.0,
            "{reason}"
        );
    }
}

/// A Redis quota board that cannot reach Redis counts the outage.
#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_outages_are_counted() {
    use tower_claude::quota::RedisOptions;
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Nothing listens on port 1: the board starts degraded (limiting locally).
    let board = QuotaBoard::redis(
        "redis://127.0.0.1:1/",
        RedisOptions::new().connect_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    assert!(board.redis_status().unwrap().degraded);
    let m = scrape(&handle);
    assert_eq!(get(&m, "tower_claude_quota_redis_outages_total"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn prompt_cache_tokens_and_hit_ratio_per_key_and_group() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let board = QuotaBoard::new();
    let metrics_layer = MetricsLayer::new().board(board.clone());
    let mock = MockClaude::builder().output_tokens(10).build();
    let svc = ServiceBuilder::new()
        .layer(metrics_layer.clone())
        .layer(RateLimitLayer::new().board(board.clone()))
        .service(mock.clone());
    // A 2,000-token system prompt marked for caching, sent four times (JSON and SSE): one
    // cache write, three reads.
    let system = "cached instructions ".repeat(300);
    for stream in [false, true, false, true] {
        let body = format!(
            r#"{{"model":"{MODEL}","max_tokens":50,"stream":{stream},"system":[{{"type":"text","text":"{system}","cache_control":{{"type":"ephemeral"}}}}],"messages":[{{"role":"user","content":"Hi"}}]}}"#
        );
        let req = Request::post("/v1/messages")
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .body(RequestBody::from(body))
            .unwrap();
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    metrics_layer.refresh();
    let stats = mock.stats();
    let g = group();
    let (read, write) = (stats.cache_read_tokens[&g], stats.cache_write_tokens[&g]);
    assert_eq!(read, 3 * write);
    let key = KeyId::from_api_key(KEY);
    let labels = format!(r#"{{key="{}",group="{g}"}}"#, key.as_str());
    let m = scrape(&handle);
    assert_eq!(
        get(
            &m,
            &format!("{}{labels}", names::PROMPT_CACHE_READ_TOKENS_TOTAL)
        ),
        read as f64
    );
    assert_eq!(
        get(
            &m,
            &format!("{}{labels}", names::PROMPT_CACHE_WRITE_TOKENS_TOTAL)
        ),
        write as f64
    );
    let ratio = get(&m, &format!("{}{labels}", names::PROMPT_CACHE_HIT_RATIO));
    assert!((0.7..0.75).contains(&ratio), "{ratio}");
    // The same totals are on the board's status data (the proxy's status page).
    let status = board.statuses().into_iter().find(|s| s.key == key).unwrap();
    let cache = status.prompt_cache.unwrap();
    assert_eq!((cache.read_tokens, cache.write_tokens), (read, write));
}

/// Reads a body the way hyper's server does: frames until `is_end_stream()` is true (or the
/// end), then drops it without polling for the final `None`.
async fn drain_like_hyper<B>(body: B) -> bytes::Bytes
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    while !http_body::Body::is_end_stream(&body) {
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame.unwrap().into_data() {
                    out.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
    drop(body);
    out.freeze()
}

/// Issue 18, bug 6: a JSON body of known length is never polled to `None` by hyper; it was
/// counted `outcome="cancelled"` with no tokens.
#[tokio::test(start_paused = true)]
async fn a_body_read_until_is_end_stream_counts_success_and_tokens() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let body = br#"{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-6","stop_reason":"end_turn","usage":{"input_tokens":11,"output_tokens":7}}"#;
    let upstream = tower::service_fn(move |_req: Request<RequestBody>| async move {
        let response = Response::builder()
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
            .unwrap();
        Ok::<_, std::convert::Infallible>(response)
    });
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .service(upstream);
    for _ in 0..3 {
        let response = svc.clone().oneshot(request(MODEL, false)).await.unwrap();
        assert_eq!(response.status(), 200);
        let read = drain_like_hyper(response.into_body()).await;
        assert_eq!(&read[..], &body[..]);
    }
    let m = scrape(&handle);
    let g = group();
    let series = |outcome: &str| {
        format!(
            r#"tower_claude_requests_total{{model="{MODEL}",group="{g}",status="200",outcome="{outcome}"}}"#
        )
    };
    assert_eq!(get(&m, &series("success")), 3.0, "{m:#?}");
    assert_eq!(get(&m, &series("cancelled")), 0.0);
    let labels = format!(r#"{{model="{MODEL}",group="{g}"}}"#);
    assert_eq!(
        get(&m, &format!("tower_claude_output_tokens_total{labels}")),
        21.0
    );
    assert_eq!(
        get(&m, &format!("tower_claude_input_tokens_total{labels}")),
        33.0
    );
    assert_eq!(get(&m, "tower_claude_in_flight_requests"), 0.0);
}

/// `MetricsLayer::json_limit` above the rate limiter's 8 MiB copy: the one usage tracker (the
/// rate limiter below published it) copies a JSON answer up to the larger limit, so the
/// tokens of a 9 MiB answer are counted (they went uncounted when the limit of the layer
/// that published the tracker won).
#[tokio::test(start_paused = true)]
async fn a_json_limit_above_the_rate_limiters_is_honoured() {
    let recorder = prometheus::builder().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let big = format!(
        r#"{{"type":"message","model":"{MODEL}","content":[{{"type":"text","text":"{}"}}],"usage":{{"input_tokens":11,"output_tokens":7}}}}"#,
        "x".repeat(9 << 20)
    );
    let upstream = tower::service_fn(move |_req: Request<RequestBody>| {
        let body = http_body_util::Full::new(bytes::Bytes::from(big.clone()));
        async move {
            Ok::<_, tower_claude::BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(MetricsLayer::new().json_limit(16 << 20))
        .layer(RateLimitLayer::new())
        .service(upstream);
    let response = svc.oneshot(request(MODEL, false)).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let m = scrape(&handle);
    let labels = format!(r#"{{model="{MODEL}",group="{}"}}"#, group());
    assert_eq!(
        get(&m, &format!("tower_claude_output_tokens_total{labels}")),
        7.0
    );
}
