//! The proxy's HTTP edge over real loopback HTTP (issues 18 and 16): connection timeouts and the
//! connection cap, authentication before the body, idle upstream connections, path checks,
//! credentials parsing, tower-http's body limit / request ids / panics, and the log.
#![cfg(feature = "proxy")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::proxy::{config, serve, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tower_claude::BoxError;
use tower_claude::anthropic::{ApiError, ApiErrorKind};
use tower_claude::body::RequestBody;
use tower_claude::proxy::{Cli, Proxy};
use tower_claude::testing::MockClaude;

fn cli_for(upstream: String) -> Cli {
    Cli {
        upstream: Some(upstream),
        cache: Some(false),
        ..Cli::default()
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

const HELLO: &str = r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}"#;

fn messages(addr: SocketAddr, body: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A raw HTTP/1.1 answer: status, head (lower-cased), body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }

    fn error_kind(&self) -> ApiErrorKind {
        ApiError::from_response(StatusCode::from_u16(self.status).unwrap(), &self.body).kind()
    }
}

/// Reads one HTTP/1.1 response (with a `content-length`) from `stream`.
async fn read_response(stream: &mut TcpStream) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut raw = Raw {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let len: usize = raw
        .header("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    while raw.body.len() < len {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed inside a response body");
        raw.body.extend_from_slice(&chunk[..n]);
    }
    raw
}

/// Sends `request` as written (no normalisation by a client library) and reads the answer.
async fn raw(addr: SocketAddr, request: &str) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("an answer in time")
}

/// Whether the peer closed `stream` within `within` (reads and discards anything sent).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A loopback upstream that answers every request with a small valid message after `delay`,
/// records the paths it receives and counts its open connections.
#[derive(Clone, Default)]
struct Upstream {
    open: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn serve(&self, delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let this = this.clone();
                this.open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let paths = this.paths.clone();
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let paths = paths.clone();
                            async move {
                                paths.lock().await.push(req.uri().path().to_owned());
                                tokio::time::sleep(delay).await;
                                let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":2}}"#;
                                let mut resp =
                                    Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                                resp.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                resp.headers_mut()
                                    .insert("request-id", "req_upstream_1".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    this.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        addr
    }
}

/// Issue 18 bug 5: a client that sends nothing, one that stops inside its request head and one
/// that stays idle after an answer are all closed by the proxy (they stayed open for good).
#[tokio::test]
async fn slow_and_idle_connections_are_closed() {
    let proxy = start(
        Cli {
            header_read_timeout: Some("300ms".into()),
            idle_timeout: Some("600ms".into()),
            ..cli_for("mock".into())
        },
        &[],
    )
    .await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut partial = TcpStream::connect(proxy.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.status, 200);
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "silent client"
    );
    assert!(
        closed_within(&mut partial, Duration::from_secs(5)).await,
        "partial head"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)).await,
        "idle keep-alive"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

/// Issue 18 bug 5: at the connection cap the oldest idle connections are closed to make room,
/// and a health check still gets in (long timeouts: only the cap can close them here).
#[tokio::test]
async fn the_connection_cap_makes_room_for_new_clients() {
    let proxy = start(
        Cli {
            max_connections: Some(8),
            header_read_timeout: Some("60s".into()),
            ..cli_for("mock".into())
        },
        &[],
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = std::time::Instant::now();
    let health = raw(proxy.addr, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(health.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let mut closed = 0;
    for s in &mut slow {
        if closed_within(s, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    // 21 connections came, at most 8 are open: at least 13 slow ones were closed.
    assert!(
        closed >= 13,
        "only {closed} of 20 slow connections were closed"
    );
    proxy.stop().await;
}

/// Client tokens are decided from the headers: a wrong token announcing a large body is
/// answered at once, without the proxy waiting for (or buffering) a single body byte.
#[tokio::test]
async fn unauthenticated_clients_are_refused_before_their_body() {
    let proxy = start(
        cli_for("mock".into()),
        &[("CLAUDE_PROXY_TOKENS", "team-token")],
    )
    .await;
    let answer = raw(
        proxy.addr,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: wrong\r\ncontent-type: application/json\r\ncontent-length: 30000000\r\n\r\n{\"mod",
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.error_kind(), ApiErrorKind::Authentication);
    proxy.stop().await;
}

/// Issue 16: tower-http's body limit refuses a declared length above 32 MB before reading the
/// body, with Anthropic's 413 envelope (the old proxy waited for the body that never came).
#[tokio::test]
async fn a_declared_length_above_the_limit_is_a_413_envelope_at_once() {
    let proxy = start(cli_for("mock".into()), &[]).await;
    let answer = raw(
        proxy.addr,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-type: application/json\r\ncontent-length: 40000000\r\n\r\n{\"model\":",
    )
    .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.error_kind(), ApiErrorKind::RequestTooLarge);
    assert!(
        answer
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    assert!(
        answer
            .header("request-id")
            .unwrap()
            .starts_with("req_proxy_")
    );
    proxy.stop().await;
}

/// Issue 18 bug 8: after a burst, the pooled upstream connections go away once idle (without
/// a pool timer they stayed open for good).
#[tokio::test]
async fn idle_upstream_connections_are_closed_after_a_burst() {
    let upstream = Upstream::default();
    let addr = upstream.serve(Duration::from_millis(300)).await;
    let proxy = start(
        Cli {
            upstream_idle_timeout: Some("500ms".into()),
            retry_strategy: Some(tower_claude::proxy::RetryStrategy::None),
            ..cli_for(format!("http://{addr}"))
        },
        &[],
    )
    .await;
    let c = client();
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let c = c.clone();
            let req = messages(proxy.addr, HELLO);
            tokio::spawn(async move {
                let resp = c.request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                resp.into_body().collect().await.unwrap();
            })
        })
        .collect();
    for task in burst {
        task.await.unwrap();
    }
    let peak = upstream.open.load(Ordering::SeqCst);
    assert!(peak > 1, "the burst used {peak} upstream connection(s)");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while upstream.open.load(Ordering::SeqCst) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {peak} upstream connections still open",
            upstream.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

/// Issue 18 bug 9: paths that could step out of `/v1/` (or out of the base URL's prefix) are
/// refused with a 400 `invalid_request_error` and never reach the upstream; a clean path goes
/// under the prefix.
#[tokio::test]
async fn paths_outside_v1_or_the_prefix_never_reach_the_upstream() {
    let upstream = Upstream::default();
    let addr = upstream.serve(Duration::ZERO).await;
    let proxy = start(
        cli_for(format!("http://{addr}/prefix")),
        &[("ANTHROPIC_API_KEY", "sk-ant-proxy-key")],
    )
    .await;
    for path in [
        "/v1/../admin",
        "/v1/messages/../../../admin/keys",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2e/%2e%2e/admin",
        "/v1/.%2e/admin",
        "/v1/..%2fadmin",
        "/v1/%2f%2fadmin",
        "/v1/%252e%252e/admin",
        "/v1//messages",
        "/v1/./messages",
    ] {
        let answer = raw(
            proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(answer.status, 400, "{path}");
        assert_eq!(answer.error_kind(), ApiErrorKind::InvalidRequest, "{path}");
    }
    for path in ["/admin", "/%2e%2e/v1/messages", "/v1"] {
        let answer = raw(
            proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(answer.status, 404, "{path}");
    }
    assert!(
        upstream.paths.lock().await.is_empty(),
        "{:?}",
        upstream.paths.lock().await
    );
    let resp = client().request(messages(proxy.addr, HELLO)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(*upstream.paths.lock().await, ["/prefix/v1/messages"]);
    proxy.stop().await;
}

/// Issue 18: `bearer` in any case is accepted, and an empty `x-api-key` beside a valid Bearer
/// token does not win.
#[tokio::test]
async fn bearer_in_any_case_and_an_empty_api_key_header() {
    let proxy = start(
        cli_for("mock".into()),
        &[("CLAUDE_PROXY_TOKENS", "team-token")],
    )
    .await;
    let c = client();
    for (api_key, auth, expected) in [
        (None, Some("bearer team-token"), StatusCode::OK),
        (None, Some("BEARER  team-token"), StatusCode::OK),
        (Some(""), Some("Bearer team-token"), StatusCode::OK),
        (Some("  "), Some("Bearer team-token"), StatusCode::OK),
        (
            Some("wrong"),
            Some("Bearer team-token"),
            StatusCode::UNAUTHORIZED,
        ),
        (None, Some("Basic team-token"), StatusCode::UNAUTHORIZED),
        (None, Some("Bearer "), StatusCode::UNAUTHORIZED),
    ] {
        let mut req = messages(proxy.addr, HELLO);
        if let Some(k) = api_key {
            req.headers_mut().insert("x-api-key", k.parse().unwrap());
        }
        if let Some(a) = auth {
            req.headers_mut()
                .insert("authorization", a.parse().unwrap());
        }
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), expected, "{api_key:?} {auth:?}");
        resp.into_body().collect().await.unwrap();
    }
    proxy.stop().await;
}

/// Issue 16: the upstream's `request-id` goes back as is; answers the proxy makes itself carry
/// its own `req_proxy_…` id; a client's own `request-id` is not echoed.
#[tokio::test]
async fn request_ids_are_forwarded_or_generated() {
    let mock = MockClaude::builder().build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let c = client();
    let mut req = messages(proxy.addr, HELLO);
    req.headers_mut()
        .insert("x-api-key", "sk-client".parse().unwrap());
    req.headers_mut()
        .insert("request-id", "client-chosen".parse().unwrap());
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let id = resp.headers()["request-id"].to_str().unwrap().to_owned();
    assert!(
        id.starts_with("req_") && !id.starts_with("req_proxy_"),
        "{id}"
    );
    let mut ids = Vec::new();
    for path in ["/nope", "/healthz", "/nope"] {
        let mut req = Request::get(format!("http://{}{path}", proxy.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.headers_mut()
            .insert("request-id", "client-chosen".parse().unwrap());
        let resp = c.request(req).await.unwrap();
        let id = resp.headers()["request-id"].to_str().unwrap().to_owned();
        assert!(
            id.starts_with("req_proxy_") && id.len() == 34,
            "{path}: {id}"
        );
        ids.push(id);
    }
    assert_ne!(ids[0], ids[2], "each answer has its own id");
    proxy.stop().await;
}

/// Issue 16: a panic below the edge is answered 500 `api_error` with a request id, and the
/// proxy keeps serving (before, the connection was dropped without an answer).
#[tokio::test]
async fn a_panicking_upstream_is_a_500_and_the_proxy_keeps_serving() {
    let mock = MockClaude::builder().build();
    let upstream = tower::service_fn(move |req: Request<RequestBody>| {
        let mock = mock.clone();
        async move {
            if req.body().bytes().windows(5).any(|w| w == b"PANIC") {
                panic!("the upstream service panicked");
            }
            let resp: Result<_, BoxError> = tower::ServiceExt::oneshot(mock, req).await;
            resp
        }
    });
    let cfg = config(
        Cli {
            retry_strategy: Some(tower_claude::proxy::RetryStrategy::None),
            ..cli_for("mock".into())
        },
        &[],
    );
    let proxy = serve(Proxy::with_upstream(cfg, upstream).unwrap()).await;
    let c = client();
    let boom = HELLO.replace("Say hello", "PANIC");
    for _ in 0..2 {
        let mut req = messages(proxy.addr, &boom);
        req.headers_mut()
            .insert("x-api-key", "sk-client".parse().unwrap());
        let resp = c
            .request(req)
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            resp.headers()["request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_proxy_")
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            ApiError::from_response(StatusCode::INTERNAL_SERVER_ERROR, &body).kind(),
            ApiErrorKind::Api
        );
    }
    let mut req = messages(proxy.addr, HELLO);
    req.headers_mut()
        .insert("x-api-key", "sk-client".parse().unwrap());
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "still serving");
    proxy.stop().await;
}

/// The settings a spawned `claude-proxy` must not inherit from the test's environment: keys
/// and client tokens (the tests give their own) and thread counts (the tests that need one
/// set it).
fn without_inherited_settings(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_API_KEYS",
        "CLAUDE_PROXY_TOKENS",
        "CLAUDE_PROXY_WORKER_THREADS",
        "TOKIO_WORKER_THREADS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs the real `claude-proxy` binary with its log (standard error) going to a file, sends
/// it `requests`, stops it, and returns the log.
async fn binary_log(
    args: &[&str],
    env: &[(&str, &str)],
    requests: &[Request<Full<Bytes>>],
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-proxy"));
    without_inherited_settings(cmd.as_std_mut());
    cmd.args(["--listen", "127.0.0.1:0", "--cache", "false"])
        .args(args)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the claude-proxy binary");
    let addr: SocketAddr = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(rest) = text.split("listening on http://").nth(1) {
                if let Some(addr) = rest.split_whitespace().next() {
                    return addr.parse().unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the proxy starts");
    let c = client();
    for req in requests {
        let mut sent = Request::builder()
            .method(req.method())
            .uri(format!("http://{addr}{}", req.uri().path()))
            .body(req.body().clone())
            .unwrap();
        *sent.headers_mut() = req.headers().clone();
        let resp = c.request(sent).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    std::fs::read(&log_path).unwrap()
}

fn with_headers(body: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::post("http://placeholder/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// Issue 16: at TRACE, with the request headers logged, neither the client's token nor the
/// proxy's upstream key appears in the proxy's log; the log written to a file has no colour.
#[tokio::test]
async fn keys_never_reach_the_log_even_at_trace_and_a_log_file_has_no_colour() {
    const UPSTREAM_KEY: &str = "sk-ant-edge-UPSTREAM-SECRET-1";
    const CLIENT_TOKEN: &str = "tok-edge-CLIENT-SECRET-2";
    let mock = MockClaude::builder().api_keys([UPSTREAM_KEY]).build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let upstream = format!("http://{upstream}");
    let log = binary_log(
        &["--upstream", &upstream],
        &[
            ("RUST_LOG", "trace"),
            ("ANTHROPIC_API_KEY", UPSTREAM_KEY),
            ("CLAUDE_PROXY_TOKENS", CLIENT_TOKEN),
        ],
        &[
            with_headers(HELLO, &[("x-api-key", CLIENT_TOKEN)]),
            with_headers(
                HELLO,
                &[("authorization", &format!("Bearer {CLIENT_TOKEN}"))],
            ),
        ],
    )
    .await;
    assert_eq!(mock.stats().accepted, 2, "both requests were served");
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("request received"), "TRACE is on: {text}");
    assert!(
        text.contains("Sensitive"),
        "credentials are marked sensitive"
    );
    assert!(
        !text.contains(UPSTREAM_KEY),
        "the upstream key is in the log"
    );
    assert!(
        !text.contains(CLIENT_TOKEN),
        "the client token is in the log"
    );
    assert!(!text.contains("SECRET"), "part of a secret is in the log");
    assert!(!log.contains(&0x1b), "an escape byte in the log file");
}

/// Issue 16: `--log-format json` writes one JSON object per log line; `--api-key` on the
/// command line is warned about.
#[tokio::test]
async fn json_log_lines_and_a_warning_for_a_key_on_the_command_line() {
    let log = binary_log(
        &[
            "--upstream",
            "mock",
            "--log-format",
            "json",
            "--api-key",
            "sk-ant-on-the-command-line",
        ],
        &[("CLAUDE_PROXY_UPSTREAM", "mock")],
        &[with_headers(HELLO, &[])],
    )
    .await;
    let text = String::from_utf8(log).unwrap();
    let json: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let warning = json
        .iter()
        .find(|v| v["fields"]["flag"] == "--api-key")
        .unwrap_or_else(|| panic!("no warning about --api-key: {text}"));
    assert_eq!(warning["level"], "WARN");
    assert!(!text.contains("sk-ant-on-the-command-line"));
    assert!(!text.as_bytes().contains(&0x1b));
}

/// Issue 14: `--worker-threads` and `CLAUDE_PROXY_WORKER_THREADS` size the runtime of the
/// real binary (its start-up log says how many threads it got, and it serves on one); without
/// them Tokio's `TOKIO_WORKER_THREADS`, else one per core; a count of zero or past 1024 (or a
/// bad `TOKIO_WORKER_THREADS`, on which Tokio itself would panic) stops the proxy at start
/// with a message naming the option, not a panic.
#[tokio::test]
async fn worker_threads_from_the_flag_and_the_environment_and_bad_counts_refused() {
    // (flags, environment, what the start-up log says); the first also serves a request.
    for (args, env, logged) in [
        (
            &["--worker-threads", "1"][..],
            ("CLAUDE_PROXY_WORKER_THREADS", "3"),
            [
                "as configured",
                "worker_threads=1",
                "scheduler=\"current-thread\"",
            ],
        ),
        (
            &[][..],
            ("CLAUDE_PROXY_WORKER_THREADS", "3"),
            [
                "as configured",
                "worker_threads=3",
                "scheduler=\"multi-thread\"",
            ],
        ),
        (
            &[][..],
            ("TOKIO_WORKER_THREADS", "2"),
            [
                "as configured",
                "worker_threads=2",
                "scheduler=\"multi-thread\"",
            ],
        ),
    ] {
        let requests = if args.is_empty() {
            Vec::new()
        } else {
            vec![with_headers(HELLO, &[])]
        };
        let args: Vec<&str> = ["--upstream", "mock"].iter().chain(args).copied().collect();
        let log = binary_log(&args, &[env], &requests).await;
        let text = String::from_utf8_lossy(&log);
        assert!(
            logged.iter().all(|l| text.contains(l)),
            "{args:?} {env:?}: {text}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    for (args, env, message) in [
        (
            &["--worker-threads", "0"][..],
            None,
            "invalid configuration: --worker-threads: `0`: must be between 1 and 1024",
        ),
        (
            &[][..],
            Some(("CLAUDE_PROXY_WORKER_THREADS", "100000")),
            "invalid configuration: CLAUDE_PROXY_WORKER_THREADS: `100000`: must be between 1 \
             and 1024",
        ),
        (
            &[][..],
            Some(("TOKIO_WORKER_THREADS", "0")),
            "invalid configuration: TOKIO_WORKER_THREADS: `0`: must be between 1 and 1024",
        ),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_claude-proxy"));
        without_inherited_settings(&mut cmd)
            .args(["--listen", "127.0.0.1:0", "--upstream", "mock"])
            .args(args)
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("the claude-proxy binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A body that does not arrive within the proxy's deadline is answered 408 (before, the proxy
/// waited for it as long as the client kept the connection open).
#[tokio::test]
async fn a_body_that_never_arrives_ends_at_the_deadline() {
    let proxy = start(
        Cli {
            deadline: Some("500ms".into()),
            ..cli_for("mock".into())
        },
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    let answer = raw(
        proxy.addr,
        "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mod",
    )
    .await;
    assert_eq!(answer.status, 408);
    assert_eq!(answer.error_kind(), ApiErrorKind::RequestTimeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

/// A body that arrives in pieces (after its head, or chunked) reaches the upstream whole: the
/// handler reads a body that came with its head in one poll and collects any other.
#[tokio::test]
async fn a_body_in_pieces_reaches_the_upstream_whole() {
    let mock = MockClaude::builder().build();
    let (upstream, _task) = mock.serve_on_loopback().await.unwrap();
    let proxy = start(cli_for(format!("http://{upstream}")), &[]).await;
    let (first, second) = HELLO.split_at(HELLO.len() / 2);
    let head = "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n";
    let sized = (
        format!("{head}content-length: {}\r\n\r\n{first}", HELLO.len()),
        second.to_owned(),
    );
    let chunked = (
        format!(
            "{head}transfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n",
            first.len()
        ),
        format!("{:x}\r\n{second}\r\n0\r\n\r\n", second.len()),
    );
    let whole = (
        format!("{head}content-length: {}\r\n\r\n{HELLO}", HELLO.len()),
        String::new(),
    );
    for (n, (start, rest)) in [sized, chunked, whole].into_iter().enumerate() {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(start.as_bytes()).await.unwrap();
        if !rest.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(rest.as_bytes()).await.unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
            .await
            .expect("an answer in time");
        assert_eq!(
            answer.status,
            200,
            "request {n}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(mock.stats().accepted, n as u64 + 1);
    }
    proxy.stop().await;
}
