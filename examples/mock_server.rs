//! The Claude simulator as a standalone HTTP server, for trying SDKs, the proxy or a multi-node
//! setup without an API key.
//!
//! ```sh
//! cargo run --example mock_server --features testing -- --listen 127.0.0.1:9000 --rpm 20
//! ANTHROPIC_BASE_URL=http://127.0.0.1:9000 ANTHROPIC_API_KEY=sk-test python your_script.py
//! ```
//!
//! Options (all optional): `--listen ADDR` (default 127.0.0.1:9000), `--rpm N`, `--itpm N`,
//! `--otpm N` (per key and model group; defaults 50 / 30000 / 8000), `--overloaded F` (share
//! of 529 answers), `--latency-ms N`, `--seconds N` (stop after N seconds; default: run until
//! Ctrl-C).

use std::time::Duration;

use tower_claude::testing::{MockClaude, MockLimits};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => match args.get(i + 1).map(|v| v.parse()) {
            Some(Ok(v)) => v,
            _ => {
                eprintln!("mock_server: {name} needs a valid value");
                std::process::exit(2);
            }
        },
        None => default,
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listen: String = arg("--listen", "127.0.0.1:9000".to_owned());
    let limits = MockLimits {
        rpm: arg("--rpm", 50),
        itpm: arg("--itpm", 30_000),
        otpm: arg("--otpm", 8_000),
    };
    let mock = MockClaude::builder()
        .default_limits(limits)
        .overloaded_rate(arg("--overloaded", 0.0))
        .latency(
            Duration::from_millis(arg("--latency-ms", 50)),
            Duration::ZERO,
        )
        .build();
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!(
        "Claude simulator on http://{} (rpm {}, itpm {}, otpm {} per key and model group)",
        listener.local_addr()?,
        limits.rpm,
        limits.itpm,
        limits.otpm
    );
    let seconds: u64 = arg("--seconds", 0);
    let stop = async move {
        if seconds > 0 {
            tokio::time::sleep(Duration::from_secs(seconds)).await;
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    };
    tokio::select! {
        result = mock.serve(listener) => result?,
        () = stop => {}
    }
    let stats = mock.stats();
    eprintln!(
        "served {} requests: {} accepted, {} refused with 429",
        stats.received, stats.accepted, stats.rate_limited
    );
    Ok(())
}
