//! Interop: the official Anthropic Python SDK (`pip install anthropic`) against the served
//! simulator. Runs `tests/interop/python_sdk.py` in real time (a few seconds: it waits for one
//! real `retry-after: 1`). Skips, saying why, when `python3` or the `anthropic` module is
//! missing — unless the `CI` environment variable is set, then it fails.
#![cfg(feature = "testing")]

use std::time::Duration;

use tokio::process::Command;
use tower_claude::testing::{Fault, MockClaude, MockLimits};

const OUTPUT_TOKENS: u64 = 12;
/// The script's exit code when the `anthropic` module is missing.
const SKIP: i32 = 77;

/// Returns normally (skip) outside CI; panics in CI.
fn skip(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("python SDK interop test cannot run: {reason} (CI is set, so this is a failure)");
    }
    eprintln!("skipping the python SDK interop test: {reason}");
}

fn python() -> Command {
    let mut cmd = Command::new("python3");
    // Loopback only: never through a proxy from the environment.
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_talks_to_the_simulator() {
    let main = MockClaude::builder().output_tokens(OUTPUT_TOKENS).build();
    let limited = MockClaude::builder()
        .default_limits(MockLimits::new(60, 1_000_000, 1_000_000))
        .output_tokens(4)
        .build();
    for _ in 0..2 {
        limited.push_fault(Fault::RateLimited {
            retry_after: Duration::from_secs(1),
        });
    }
    let (main_addr, main_server) = main.serve_on_loopback().await.unwrap();
    let (limited_addr, limited_server) = limited.serve_on_loopback().await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/python_sdk.py");
    let run = python()
        .arg(script)
        .env("ANTHROPIC_BASE_URL", format!("http://{main_addr}"))
        .env("ANTHROPIC_API_KEY", "sk-ant-interop-test")
        .env("MOCK_LIMITED_BASE_URL", format!("http://{limited_addr}"))
        .env("MOCK_OUTPUT_TOKENS", OUTPUT_TOKENS.to_string())
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the python script did not finish in 60 s")
    {
        Ok(out) => out,
        Err(e) => return skip(&format!("python3 cannot be run ({e})")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if out.status.code() == Some(SKIP) {
        return skip("the `anthropic` Python module is missing (pip install anthropic)");
    }
    assert!(out.status.success(), "python_sdk.py failed: {stderr}");
    assert!(stdout.trim_end().ends_with("ok"));

    // The simulator's side of the story.
    let stats = main.stats();
    assert_eq!(stats.accepted, 5);
    assert_eq!(stats.by_status.get(&400), Some(&1));
    assert!(
        stats.by_status.keys().all(|s| [200, 400].contains(s)),
        "{stats:?}"
    );
    let stats = limited.stats();
    // The SDK really retried the scripted 429 once, and the burst hit the limit.
    assert!(stats.rate_limited >= 3, "{stats:?}");
    assert!((61..=64).contains(&stats.accepted), "{stats:?}");

    main_server.abort();
    limited_server.abort();
}
