//! The scale scenario of `scripts/scale-bench.sh` in process, on tokio's paused clock
//! (`tower_claude::testing::scale`): deterministic, and well under a second of wall time.
//!
//! ```text
//! cargo run --release --features testing --example scale_sim -- [KEYS] [TASKS_PER_FLEET]
//! LATENCY_MS=0 OTPM=1000000 cargo run --release --features testing --example scale_sim
//! ```
//!
//! Prints the elapsed simulated time against the ideal from the request limit, each fleet's
//! finish, the failed tasks and the upstream 429s. `RPM`, `ITPM`, `OTPM`, `LATENCY_MS` and
//! `OUTPUT` change the upstream (defaults: 120, 40000, 8000, 500, 60). `RAISE_AFTER_MS` raises
//! the limits that long into the run to `RAISE_RPM`, `RAISE_ITPM`, `RAISE_OTPM` (defaults:
//! 4× each), as the `raise` configuration of `scripts/scale-bench.sh` does
//! (`RPM=60 RAISE_AFTER_MS=10000 ... -- 1 300`). `TRACE_MS=<ms>` prints, that often, the
//! board's remaining requests / input / output tokens of each key against the upstream's
//! levels (then the requests in flight as the board counts them).

use std::time::Duration;

use tower_claude::testing::MockLimits;
use tower_claude::testing::scale::{ScaleConfig, run};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let limits = MockLimits::new(env("RPM", 120), env("ITPM", 40_000), env("OTPM", 8_000));
    let raise = std::env::var("RAISE_AFTER_MS").ok().map(|_| {
        let to = MockLimits::new(
            env("RAISE_RPM", 4 * limits.rpm),
            env("RAISE_ITPM", 4 * limits.itpm),
            env("RAISE_OTPM", 4 * limits.otpm),
        );
        (Duration::from_millis(env("RAISE_AFTER_MS", 10_000)), to)
    });
    let config = ScaleConfig {
        keys: args.next().and_then(|a| a.parse().ok()).unwrap_or(1),
        tasks_per_fleet: args.next().and_then(|a| a.parse().ok()).unwrap_or(200),
        limits,
        latency: Duration::from_millis(env("LATENCY_MS", 500)),
        output_tokens: env("OUTPUT", 60),
        seed: env("SEED", 1),
        raise,
        trace_every: std::env::var("TRACE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        ..ScaleConfig::default()
    };
    let report = run(&config).await;
    for s in &report.trace {
        let board = s.board.map(|b| b.map_or("?".to_owned(), |v| v.to_string()));
        let server = s
            .server
            .map_or(["?".to_owned(), "?".to_owned(), "?".to_owned()], |l| {
                l.map(|v| v.to_string())
            });
        println!(
            "t {:7.2} key {} board {:>4} {:>6} {:>6}  server {:>4} {:>6} {:>6}  in flight {}",
            s.at.as_secs_f64(),
            s.key,
            board[0],
            board[1],
            board[2],
            server[0],
            server[1],
            server[2],
            s.in_flight
        );
    }
    let fleets: Vec<String> = report
        .fleets
        .iter()
        .map(|t| format!("{:.1}", t.as_secs_f64()))
        .collect();
    let after_raise = config.raise.map_or(String::new(), |(after, _)| {
        let (e, i, a) = (
            report.elapsed.as_secs_f64(),
            report.ideal.as_secs_f64(),
            after.as_secs_f64(),
        );
        let mut out = format!(
            ", after the raise {:.2} s vs {:.2} s ({:.3}x)",
            e - a,
            i - a,
            (e - a) / (i - a)
        );
        // From the first answer that carries the raise, against an exact client that
        // learns it then: its admissions still end at the ideal (the extra quota waits in
        // the bucket), its last answer a latency later.
        if let Some(seen) = report.raise_seen {
            let (f, lat) = (seen.as_secs_f64(), config.latency.as_secs_f64());
            out += &format!(
                ", from the first answer carrying it ({f:.2} s) {:.2} s vs {:.2} s ({:.3}x)",
                e - f,
                i + lat - f,
                (e - f) / (i + lat - f)
            );
        }
        out
    });
    println!(
        "keys {} tasks {}: {:.1} s (ideal {:.1} s, {:.3}x), failed {}, upstream 429s {}, fleets {}, per key {:?}{}",
        config.keys,
        config.tasks_per_fleet * config.keys as u64,
        report.elapsed.as_secs_f64(),
        report.ideal.as_secs_f64(),
        report.ratio(),
        report.failed,
        report.upstream_429,
        fleets.join(" "),
        report.per_key,
        after_raise
    );
}
