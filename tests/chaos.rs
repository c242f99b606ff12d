//! The chaos suite: `claude-proxy` over real loopback HTTP in front of a hostile upstream
//! (`testing::ChaosUpstream`), and hostile clients. Bounded in time (a 2 s request deadline;
//! the whole file runs in well under a minute).
//!
//! Invariants asserted:
//! * every request ends with a complete answer or an Anthropic-style error inside its
//!   deadline plus a margin;
//! * no request reaches the upstream more often than the retry policy allows;
//! * nothing is left behind: no request in flight or queued on the status page, and the
//!   process's network sockets back to their baseline once idle connections time out;
//! * quota entries stay bounded under 10,000 made-up model names;
//! * with the response cache on, only complete answers are ever served from it;
//! * no upstream key appears in any response, the status page or `/metrics`;
//! * a hostile client cannot take keys out of rotation or poison a group for others.
#![cfg(feature = "proxy")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_claude::anthropic::{ApiError, StreamTracker};
use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
use tower_claude::testing::{Chaos, ChaosUpstream};

type TestClient = Client<HttpConnector, Full<Bytes>>;

const KEYS: &str = "sk-ant-chaos-key-one,sk-ant-chaos-key-two,sk-ant-chaos-key-three";
const DEADLINE: Duration = Duration::from_secs(2);
/// Scheduling slack on a shared two-core machine.
const MARGIN: Duration = Duration::from_secs(3);
/// Attempts per request: `max_retries` 2.
const ATTEMPTS: u64 = 3;

/// The tests of this file share the process (its file descriptors, its RSS): one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    proxy: SocketAddr,
    /// Where the upstream listens.
    chaos_addr: SocketAddr,
    chaos: ChaosUpstream,
    client: TestClient,
    /// Every byte a client saw (to look for secrets).
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
}

/// The proxy in front of a fresh `ChaosUpstream`. `pooled`: the test client keeps its
/// connections to the proxy (else one connection per request, closed after it). `cache`: the
/// response cache on (every request cacheable, in memory), else off.
async fn setup(pooled: bool, cache: bool) -> Setup {
    let chaos = ChaosUpstream::new(Chaos::Ok)
        .unauthorized_path("/v1/organizations/me")
        .known_models_only(true);
    let (upstream, _server) = chaos.serve_on_loopback().await.unwrap();
    let cli = Cli {
        upstream: Some(format!("http://{upstream}")),
        deadline: Some(DEADLINE.as_secs().to_string()),
        max_retries: Some(ATTEMPTS as u32 - 1),
        cache: Some(cache),
        cache_mode: cache.then(|| "all".into()),
        cache_path: cache.then(|| "memory".into()),
        fallback: Some(false),
        upstream_idle_timeout: Some("1s".into()),
        ..Cli::default()
    };
    let env: BTreeMap<String, String> = [("ANTHROPIC_API_KEYS".to_owned(), KEYS.to_owned())].into();
    let config = ProxyConfig::resolve(cli, &env).expect("config");
    let proxy = Proxy::new(config).expect("proxy");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(proxy.serve(listener, std::future::pending::<()>()));
    Setup {
        proxy: addr,
        chaos_addr: upstream,
        chaos,
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(if pooled { usize::MAX } else { 0 })
            .build_http(),
        seen: Arc::default(),
    }
}

fn body(model: &str, stream: bool) -> String {
    body_with(model, stream, "hi")
}

fn body_with(model: &str, stream: bool, prompt: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    )
}

/// How a request ended, as the client saw it.
#[derive(Debug)]
struct Ended {
    status: StatusCode,
    body: Bytes,
    took: Duration,
    /// `x-tower-claude-cache` of the answer.
    cache: Option<String>,
}

impl Setup {
    async fn send(&self, chaos: &str, id: &str, model: &str, stream: bool) -> Ended {
        self.send_body(chaos, id, body(model, stream)).await
    }

    async fn send_body(&self, chaos: &str, id: &str, body: String) -> Ended {
        let req = Request::post(format!("http://{}/v1/messages", self.proxy))
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .header("x-chaos", chaos)
            .header("x-chaos-id", id)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.request(req).await
    }

    async fn request(&self, req: Request<Full<Bytes>>) -> Ended {
        let start = Instant::now();
        let what = format!("{} {:?}", req.uri(), req.headers().get("x-chaos"));
        let ended = tokio::time::timeout(DEADLINE + MARGIN, async {
            let resp = self.client.request(req).await.expect("response head");
            let status = resp.status();
            let cache = resp
                .headers()
                .get("x-tower-claude-cache")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut seen = format!("{:?}", resp.headers()).into_bytes();
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{what}: the body failed instead of ending: {e}"))
                .to_bytes();
            seen.extend_from_slice(&body);
            self.seen.lock().unwrap().extend_from_slice(&seen);
            (status, body, cache)
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: not ended within the deadline and margin"));
        Ended {
            status: ended.0,
            body: ended.1,
            took: start.elapsed(),
            cache: ended.2,
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let req = Request::get(format!("http://{}{path}", self.proxy))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let ended = self.request(req).await;
        (
            ended.status,
            String::from_utf8_lossy(&ended.body).into_owned(),
        )
    }

    async fn status_page(&self) -> serde_json::Value {
        let (status, text) = self.get("/v1/proxy/status").await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_str(&text).unwrap()
    }
}

/// A complete answer (a JSON message, or a stream that reaches `message_stop`), or an
/// Anthropic-style error: an error status with the envelope, or a stream ending with an
/// `event: error`.
/// Whether `e` is a complete answer: a 200 JSON message, or a 200 stream that reaches
/// `message_stop` without an error.
fn is_complete(e: &Ended) -> bool {
    if e.status != StatusCode::OK {
        return false;
    }
    if e.body.starts_with(b"event:") || e.body.starts_with(b"data:") {
        let mut tracker = StreamTracker::new();
        tracker.feed(&e.body);
        tracker.finish();
        tracker.is_complete() && tracker.error().is_none()
    } else {
        serde_json::from_slice::<serde_json::Value>(&e.body).is_ok_and(|v| v["type"] == "message")
    }
}

fn assert_complete_or_anthropic_error(what: &str, e: &Ended) {
    if e.status.is_success() {
        let text = String::from_utf8_lossy(&e.body);
        if text.starts_with("event:") || text.starts_with("data:") {
            let mut tracker = StreamTracker::new();
            tracker.feed(&e.body);
            tracker.finish();
            assert!(
                tracker.is_complete() || tracker.error().is_some(),
                "{what}: a 200 stream neither complete nor ended by an error: {text}"
            );
        } else {
            let v: serde_json::Value = serde_json::from_slice(&e.body)
                .unwrap_or_else(|_| panic!("{what}: a 200 that is not JSON: {text}"));
            assert_eq!(v["type"], "message", "{what}: {text}");
        }
    } else {
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap_or_else(|_| {
            panic!(
                "{what}: a {} without an error envelope: {:?}",
                e.status, e.body
            )
        });
        assert_eq!(v["type"], "error", "{what}: {v}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
        let _ = ApiError::from_response(e.status, &e.body);
    }
    assert!(e.took <= DEADLINE + MARGIN, "{what}: took {:?}", e.took);
}

fn assert_nothing_left_behind(page: &serde_json::Value) {
    for entry in page["quota"].as_array().into_iter().flatten() {
        assert_eq!(entry["in_flight"], 0, "{entry}");
        assert_eq!(entry["queue_depth"], 0, "{entry}");
    }
    for key in page["keys"].as_array().into_iter().flatten() {
        assert_eq!(key["in_flight"], 0, "{key}");
    }
}

const HOSTILE: &[&str] = &[
    "ok",
    "silent",
    "trickle:300",
    "reset",
    "cut-before",
    "cut-after",
    "no-stop",
    "ping:200",
    "garbage",
    "huge-headers",
    "limits:0",
    "limits:-1",
    "limits:18446744073709551615",
    "limits:abc",
    "usage:18446744073709551615",
    "status:500",
    "status:529",
    "status:400",
    "status:404",
    "status:418:<html>teapot</html>",
    "status:200:[1,2,3]",
    "status:200:<html>hello</html>",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_in_its_deadline_with_an_answer_or_an_anthropic_error() {
    let _serial = SERIAL.lock().await;
    let s = Arc::new(setup(true, false).await);
    let mut tasks = Vec::new();
    for (i, chaos) in HOSTILE.iter().enumerate() {
        for stream in [false, true] {
            let s = s.clone();
            let id = format!("{i}-{stream}");
            tasks.push(tokio::spawn(async move {
                let e = s.send(chaos, &id, "claude-sonnet-4-6", stream).await;
                let what = format!("x-chaos {chaos}, stream {stream}");
                assert_complete_or_anthropic_error(&what, &e);
                (id, chaos, e.status)
            }));
        }
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    // Never more attempts upstream than the retry policy allows.
    for (id, count) in s.chaos.received_by_id() {
        assert!(count <= ATTEMPTS, "{id} reached the upstream {count} times");
    }
    // The hostile limits and usage did not poison the group: plain requests still pass at
    // once.
    for i in 0..3 {
        let e = s
            .send("ok", &format!("after-{i}"), "claude-sonnet-4-6", false)
            .await;
        assert_eq!(e.status, StatusCode::OK, "{:?}", e.body);
        assert!(e.took < Duration::from_secs(1), "{:?}", e.took);
    }
    // Nothing in flight or queued once everything ended (settling is asynchronous: a moment).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let page = s.status_page().await;
    assert_nothing_left_behind(&page);
    // No key was removed by what the upstream did, and no secret in anything a client saw.
    for key in page["keys"].as_array().unwrap() {
        assert_eq!(key["state"], "active", "{key}");
    }
    let (_, metrics) = s.get("/metrics").await;
    let seen = String::from_utf8_lossy(&s.seen.lock().unwrap()).into_owned();
    for secret in KEYS.split(',') {
        assert!(!seen.contains(secret));
        assert!(!metrics.contains(secret));
        assert!(!page.to_string().contains(secret));
    }
    eprintln!("statuses: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_remove_keys_poison_groups_or_grow_the_board() {
    let _serial = SERIAL.lock().await;
    let s = Arc::new(setup(true, false).await);
    // 401 on a path the client picks, once per key and more: the client gets the 401, the
    // keys stay in rotation.
    for _ in 0..6 {
        let (status, text) = s.get("/v1/organizations/me").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    }
    let page = s.status_page().await;
    let keys = page["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    for key in keys {
        assert_eq!(key["state"], "active", "{key}");
    }
    let e = s.send("ok", "plain", "claude-sonnet-4-6", false).await;
    assert_eq!(e.status, StatusCode::OK);

    // 10,000 made-up model names (upstream answers 404): each client gets its 404, and the
    // board keeps no entry for them.
    let names = 10_000usize;
    // The first 2,000 warm up connections, pools and the allocator; growth is measured over
    // the next 8,000.
    let mut rss_warm = 0;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    for (from, to) in [(0, 2_000), (2_000, names)] {
        let mut tasks = Vec::with_capacity(to - from);
        for i in from..to {
            let s = s.clone();
            let permit = sem.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let model = format!("made-up-model-{i}-{}", "x".repeat(200));
                let e = s.send("ok", &format!("name-{i}"), &model, false).await;
                drop(permit);
                assert_eq!(e.status, StatusCode::NOT_FOUND, "{:?}", e.body);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        if from == 0 {
            rss_warm = rss_kib();
        }
    }
    let page = s.status_page().await;
    let entries = page["quota"].as_array().unwrap().len();
    assert!(
        entries <= 4,
        "{entries} quota entries after {names} made-up names"
    );
    assert_nothing_left_behind(&page);
    let rss_after = rss_kib();
    eprintln!("RSS {rss_warm} KiB after 2,000 made-up model names, {rss_after} KiB after {names}");
    // The whole test process (client, upstream and proxy): generous, but below what one
    // entry per name cost (about 4 KiB a name).
    assert!(
        rss_after.saturating_sub(rss_warm) < 24 * 1024,
        "RSS grew {} KiB over 8,000 names",
        rss_after.saturating_sub(rss_warm)
    );
    for key in page["keys"].as_array().unwrap() {
        assert_eq!(key["state"], "active", "{key}");
    }
    let e = s.send("ok", "plain-after", "claude-sonnet-4-6", true).await;
    assert_complete_or_anthropic_error("plain stream after", &e);
    assert_eq!(e.status, StatusCode::OK);
}

/// With the response cache on, every hostile answer once, then the same requests answered
/// normally: a request whose first answer was not complete (cut, garbage, an error, a stream
/// without `message_stop`) is never a hit, and every hit is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_complete_answers_are_ever_served_from_the_cache() {
    let _serial = SERIAL.lock().await;
    let s = Arc::new(setup(true, true).await);
    let mut first = Vec::new();
    for (i, chaos) in HOSTILE.iter().enumerate() {
        for stream in [false, true] {
            let body = body_with("claude-sonnet-4-6", stream, &format!("cache {i} {stream}"));
            let e = s
                .send_body(chaos, &format!("c-{i}-{stream}"), body.clone())
                .await;
            assert_complete_or_anthropic_error(&format!("x-chaos {chaos}"), &e);
            first.push((*chaos, stream, body, is_complete(&e)));
        }
    }
    // Stored after delivery: give the cache's writer a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hits = 0;
    for (chaos, stream, body, complete) in first {
        let again = s
            .send_body("ok", &format!("again-{chaos}-{stream}"), body)
            .await;
        let what = format!("x-chaos {chaos}, stream {stream}, asked again");
        assert!(is_complete(&again), "{what}: {:?}", again.body);
        let hit = again.cache.as_deref() == Some("hit");
        assert!(
            complete || !hit,
            "{what}: served from the cache though its first answer was not complete"
        );
        hits += usize::from(hit);
    }
    // The cache is on and works: the complete first answers were stored.
    assert!(hits > 0, "no hit at all");
}

/// Every hostile answer once more, then nothing: the connections the proxy opened (to the
/// upstream, 1 s idle timeout here) and the ones clients opened (closed after each request
/// here) all close, so the process's network sockets come back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_and_descriptors_go_back_to_baseline() {
    let _serial = SERIAL.lock().await;
    let s = Arc::new(setup(false, false).await);
    let baseline = open_fds();
    let at_start = describe_sockets();
    let mut tasks = Vec::new();
    for (i, chaos) in HOSTILE.iter().enumerate() {
        for stream in [false, true] {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let e = s
                    .send(
                        chaos,
                        &format!("fd-{i}-{stream}"),
                        "claude-sonnet-4-6",
                        stream,
                    )
                    .await;
                assert_complete_or_anthropic_error(&format!("x-chaos {chaos}"), &e);
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let busy = open_fds();
    // Idle upstream connections close after 1 s; allow the scheduler plenty of slack.
    let until = Instant::now() + Duration::from_secs(20);
    let mut now_open = open_fds();
    while now_open > baseline && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now_open = open_fds();
    }
    eprintln!("sockets: {baseline} at the start, {busy} after the burst, {now_open} at the end");
    assert!(
        now_open <= baseline,
        "{now_open} sockets open, {baseline} before the burst; proxy {}, upstream {}; \
         open at the start:\n{at_start}open now:\n{}",
        s.proxy,
        s.chaos_addr,
        describe_sockets()
    );
    assert_nothing_left_behind(&s.status_page().await);
}

/// The network sockets this process has open (0 where `/proc` is not available): every
/// socket descriptor but Unix-domain ones. Each tokio runtime with the signal driver holds a
/// duplicate of one process-wide Unix socket (its wake-up pipe), so the runtimes of the other
/// tests of this file, started and dropped while this one runs, move the count of all sockets
/// up and down; their TCP sockets only exist while they hold [`SERIAL`]. A TCP socket whose
/// connection is closed but whose descriptor is still held is in no table and is counted.
fn open_fds() -> usize {
    let unix = unix_socket_inodes();
    socket_inodes()
        .iter()
        .filter(|inode| !unix.contains(*inode))
        .count()
}

/// The inodes of the socket descriptors this process holds, one per descriptor.
fn socket_inodes() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd").map_or(Vec::new(), |dir| {
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|t| {
                let t = t.to_string_lossy().into_owned();
                Some(t.strip_prefix("socket:[")?.trim_end_matches(']').to_owned())
            })
            .collect()
    })
}

/// The inodes of the Unix-domain sockets of this network namespace.
fn unix_socket_inodes() -> std::collections::HashSet<String> {
    let table = std::fs::read_to_string("/proc/self/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(6).map(str::to_owned))
        .collect()
}

/// The sockets this process has open, a line each: for TCP the local and remote address and
/// the state (from `/proc/self/net/tcp`), else the table that lists it, or "unlisted" (a TCP
/// socket whose connection is closed but whose descriptor is still held is in no table), to
/// tell which connection stayed open.
fn describe_sockets() -> String {
    let addr = |hex: &str| {
        let (ip, port) = hex.split_once(':').unwrap_or((hex, "0"));
        let ip = u32::from_str_radix(ip, 16).unwrap_or(0).to_le_bytes();
        let port = u16::from_str_radix(port, 16).unwrap_or(0);
        format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3])
    };
    let tables: Vec<(&str, String)> = ["tcp", "tcp6", "udp", "unix", "netlink"]
        .into_iter()
        .map(|t| {
            let text = std::fs::read_to_string(format!("/proc/self/net/{t}")).unwrap_or_default();
            (t, text)
        })
        .collect();
    let mut out = String::new();
    for inode in socket_inodes() {
        let column = |table: &str| if table == "unix" { 6 } else { 9 };
        let found = tables.iter().find_map(|(table, text)| {
            let line = text
                .lines()
                .skip(1)
                .find(|line| line.split_whitespace().nth(column(table)) == Some(inode.as_str()))?;
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(if *table == "tcp" {
                format!("tcp {} -> {} state {}", addr(f[1]), addr(f[2]), f[3])
            } else {
                format!("{table} {}", line.trim())
            })
        });
        out += &format!("  [{inode}] {}\n", found.as_deref().unwrap_or("unlisted"));
    }
    out
}

/// The resident set size of this process, in KiB (0 where `/proc` is not available).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
