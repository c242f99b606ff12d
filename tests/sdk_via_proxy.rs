//! Interop through `claude-proxy`: the official Python SDK (`anthropic`) and TypeScript SDK
//! (`@anthropic-ai/sdk`) pointed at an in-process proxy, in front of a served simulator.
//!
//! Each test serves a [`MockClaude`] on loopback, starts the proxy on `127.0.0.1:0` with its
//! default layer stack (only the cache kept in memory), and runs a script
//! (`tests/interop/python_via_proxy.py`, `tests/interop/ts/via_proxy.mjs`) with
//! `ANTHROPIC_BASE_URL` set to the proxy. The script uses the SDK with its own retries switched
//! off (`max_retries=0` / `maxRetries: 0`), so only the proxy's protection counts, and does:
//!
//! * `messages.create`, whose first upstream attempt meets a scripted 429 (`retry-after: 1`);
//! * `count_tokens`, the upstream rate-limit headers through `with_raw_response` /
//!   `withResponse()`, `messages.stream` + the final message, and a 400 that must reach the SDK
//!   as the API's own error;
//! * a burst of [`BURST`] concurrent requests (every fourth streaming) on a model whose
//!   simulator quota is [`BURST_RPM`] requests per minute: the proxy has to hold back or retry
//!   the requests beyond the quota, and no error may reach the SDK. The refill of one request
//!   every `60 / BURST_RPM` seconds keeps the whole burst at a few seconds of real time.
//!
//! The tests run in real time (about 10 s each: the scripted `retry-after` and the quota
//! refill are real waits on both sides of a process boundary). They skip, saying why, when
//! `python3` / the `anthropic` module or `node` / `tests/interop/ts/node_modules` are missing,
//! unless the `CI` environment variable is set, in which case they fail (`.ci/run` installs
//! both).
#![cfg(feature = "proxy")]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_claude::anthropic::ModelCatalog;
use tower_claude::proxy::{Cli, Proxy, ProxyConfig};
use tower_claude::testing::{Fault, MockClaude, MockLimits};

/// Model of the single calls: the simulator's generous default limits.
const MODEL: &str = "claude-sonnet-4-6";
/// Model of the burst: the last of the fallback chain, so only waiting can serve it.
const BURST_MODEL: &str = "claude-haiku-4-5";
/// Concurrent requests in the burst.
const BURST: u64 = 40;
/// The simulator's request quota of [`BURST_MODEL`]: a bucket of 36 that refills one request
/// every 1.67 s, so the last 4 requests of the burst need about 7 s of refill.
const BURST_RPM: u64 = 36;
/// Output tokens of every answer.
const OUTPUT_TOKENS: u64 = 12;
/// Messages calls of a script that succeed besides the burst: create, the raw create, the
/// stream.
const SINGLE_MESSAGES: u64 = 3;
/// A script's exit code when its SDK is not installed.
const SKIP: i32 = 77;
/// Longest a script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Returns normally (skip) outside CI; panics in CI.
fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run: {reason} (CI is set, so this is a failure)");
    }
    eprintln!("skipping {test}: {reason}");
}

/// A served simulator and a proxy in front of it.
struct Setup {
    mock: MockClaude,
    mock_task: JoinHandle<std::io::Result<()>>,
    proxy: SocketAddr,
    stop: oneshot::Sender<()>,
    proxy_task: JoinHandle<std::io::Result<()>>,
}

impl Setup {
    async fn start() -> Self {
        let mock = MockClaude::builder()
            .limits(
                BURST_MODEL,
                MockLimits::new(BURST_RPM, 1_000_000, 1_000_000),
            )
            // A little latency, so that streams arrive as several chunks.
            .latency(Duration::from_millis(2), Duration::from_millis(1))
            .output_tokens(OUTPUT_TOKENS)
            .build();
        // The first Messages request of the script gets a 429 from upstream.
        mock.push_fault(Fault::RateLimited {
            retry_after: Duration::from_secs(1),
        });
        let (upstream, mock_task) = mock.serve_on_loopback().await.unwrap();

        // The proxy as a user starts it, except for an in-memory cache; the environment of the
        // test process (an ANTHROPIC_API_KEY, say) is deliberately not read.
        let cli = Cli {
            upstream: Some(format!("http://{upstream}")),
            cache_path: Some("memory".into()),
            ..Cli::default()
        };
        let config = ProxyConfig::resolve(cli, &BTreeMap::new()).expect("proxy config");
        let proxy = Proxy::new(config).expect("proxy");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let proxy_task = tokio::spawn(proxy.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            mock,
            mock_task,
            proxy: addr,
            stop,
            proxy_task,
        }
    }

    /// `program` with the environment of the scripts: loopback only, the proxy as base URL.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "ANTHROPIC_AUTH_TOKEN",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NO_PROXY", "127.0.0.1,localhost")
            .env("ANTHROPIC_BASE_URL", format!("http://{}", self.proxy))
            .env("ANTHROPIC_API_KEY", "sk-ant-interop-via-proxy")
            .env("INTEROP_MODEL", MODEL)
            .env("INTEROP_BURST_MODEL", BURST_MODEL)
            .env("INTEROP_BURST", BURST.to_string())
            .env("INTEROP_OUTPUT_TOKENS", OUTPUT_TOKENS.to_string())
            .kill_on_drop(true);
        cmd
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.proxy_task)
            .await
            .expect("the proxy stops")
            .expect("proxy task")
            .expect("proxy serve");
        self.mock_task.abort();
    }
}

/// Runs a script: its output, or why it could not run (the skip reason).
async fn run(mut cmd: Command, program: &str, missing_sdk: &str) -> Result<Output, String> {
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
        .await
        .expect("the script did not finish in time");
    match out {
        Err(e) => Err(format!("{program} cannot be run ({e})")),
        Ok(out) if out.status.code() == Some(SKIP) => Err(missing_sdk.to_owned()),
        Ok(out) => Ok(out),
    }
}

/// Checks a script's output and the simulator's side of the story.
fn check_run(setup: &Setup, script: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "{script} failed ({}): {stderr}",
        out.status
    );
    assert_eq!(stdout.lines().last(), Some("ok"), "{script}: {stdout}");
    let result: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .map(|json| serde_json::from_str(json).expect("result line is JSON"))
        .expect("a result line");
    assert_eq!(result["messages_ok"], SINGLE_MESSAGES + BURST, "{result}");

    let stats = setup.mock.stats();
    println!("simulator: {stats:?}");
    // Every successful SDK call was one admitted upstream request: none was served by the cache
    // (all prompts differ) and none was sent twice.
    assert_eq!(stats.accepted, SINGLE_MESSAGES + BURST, "{stats:?}");
    // The scripted 429 did happen, and the SDK (no retries of its own) never saw it.
    assert!(stats.rate_limited >= 1, "{stats:?}");
    assert!(
        stats.by_status.keys().all(|s| [200, 400, 429].contains(s)),
        "{stats:?}"
    );
    // The burst was served by the model it asked for, every answer complete.
    let catalog = ModelCatalog::default();
    let burst_group = catalog.group(BURST_MODEL).as_str().to_owned();
    assert_eq!(
        stats.output_tokens.get(&burst_group),
        Some(&(BURST * OUTPUT_TOKENS)),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_through_the_proxy() {
    const TEST: &str = "the python SDK interop test through the proxy";
    let setup = Setup::start().await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/python_via_proxy.py"
    );
    let mut cmd = setup.command("python3");
    cmd.arg(script);
    let out = run(
        cmd,
        "python3",
        "the `anthropic` Python module is missing (pip install anthropic)",
    )
    .await;
    match out {
        Ok(out) => check_run(&setup, "python_via_proxy.py", &out),
        Err(reason) => skip(TEST, &reason),
    }
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_sdk_through_the_proxy() {
    const TEST: &str = "the TypeScript SDK interop test through the proxy";
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ts");
    if !dir.join("node_modules/@anthropic-ai/sdk").is_dir() {
        return skip(
            TEST,
            "tests/interop/ts/node_modules is missing (npm install in tests/interop/ts)",
        );
    }
    let setup = Setup::start().await;
    let mut cmd = setup.command("node");
    cmd.arg(dir.join("via_proxy.mjs")).current_dir(&dir);
    let out = run(cmd, "node", "@anthropic-ai/sdk cannot be loaded").await;
    match out {
        Ok(out) => check_run(&setup, "via_proxy.mjs", &out),
        Err(reason) => skip(TEST, &reason),
    }
    setup.stop().await;
}
