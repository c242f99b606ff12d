//! Runs the rising-demand simulation (MockClaude, paused time) through four stacks and writes
//! `docs/metrics-chart.svg` and the comparison tables shown in `docs/metrics.md`.
//!
//! ```text
//! cargo run --example metrics_chart --features testing,metrics
//! ```

use tower_claude::testing::AccelerationLimit;
use tower_claude::testing::simulation::{
    SimConfig, SimReport, Strategy, simulate, svg_chart, table,
};

async fn run(strategies: &[Strategy], config: &SimConfig) -> Vec<SimReport> {
    let mut reports = Vec::new();
    for &strategy in strategies {
        reports.push(simulate(strategy, config).await);
    }
    reports
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> std::io::Result<()> {
    let config = SimConfig::default();
    let reports = run(&Strategy::ALL, &config).await;
    println!("Alone on the key ({config:?}):\n\n{}", table(&reports));

    let shared = SimConfig {
        background_rpm: 12.0,
        ..SimConfig::default()
    };
    println!(
        "Sharing the key with 12 RPM of other traffic:\n\n{}",
        table(&run(&Strategy::ALL, &shared).await)
    );

    let bursty = SimConfig {
        poisson: true,
        short_window: Some(std::time::Duration::from_secs(10)),
        ..SimConfig::default()
    };
    println!(
        "Poisson arrivals, upstream also enforcing the RPM over 10 s windows:\n\n{}",
        table(&run(&Strategy::ALL, &bursty).await)
    );

    // Acceleration limits: demand rising faster than the upstream lets usage grow.
    let accelerating = SimConfig {
        minutes: 10,
        start_rpm: 5.0,
        end_rpm: 55.0,
        ramp_minutes: Some(2),
        acceleration: Some(AccelerationLimit::new(10, 10)),
        pacing_ramp: Some(8.0),
        ..SimConfig::default()
    };
    let accel_reports = run(&Strategy::ALL, &accelerating).await;
    println!(
        "Acceleration limit (+10 RPM per minute, floor 10): 5 -> 55 RPM in 2 minutes, pacing ramp 8:\n\n{}",
        table(&accel_reports)
    );
    let jump = SimConfig {
        start_rpm: 50.0,
        end_rpm: 50.0,
        ramp_minutes: None,
        ..accelerating.clone()
    };
    println!(
        "Acceleration limit: a jump from idle to 50 RPM, pacing ramp 8:\n\n{}",
        table(&run(&[Strategy::Buckets, Strategy::PacingAndBuckets], &jump).await)
    );
    println!("Pacing + buckets on the rising demand, by pacing ramp (the upstream allows +10):\n");
    println!(
        "| pacing ramp (RPM per minute) | upstream 429s | failed | worst queue wait | median latency | worst latency |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let rows = [
        (None, None),
        (Some(6.0), None),
        (Some(8.0), None),
        (Some(8.0), Some(1e-6)),
        (Some(10.0), None),
        (Some(10.0), Some(1e-6)),
        (Some(12.0), None),
        (Some(20.0), None),
    ];
    for (ramp, trigger) in rows {
        let config = SimConfig {
            pacing_ramp: ramp,
            pacing_trigger: trigger,
            ..accelerating.clone()
        };
        let r = simulate(Strategy::PacingAndBuckets, &config).await;
        let name = ramp.map_or("none".to_owned(), |r| format!("{r:.0}"));
        let always = if trigger.is_some() { ", always on" } else { "" };
        println!(
            "| {name}{always} | {} | {} | {:.1} s | {:.1} s | {:.1} s |",
            r.upstream_429,
            r.failed,
            r.worst_queue_wait.as_secs_f64(),
            r.median_latency.as_secs_f64(),
            r.worst_latency.as_secs_f64(),
        );
    }
    println!();

    let chart: Vec<SimReport> = accel_reports
        .into_iter()
        .filter(|r| matches!(r.strategy, Strategy::Buckets | Strategy::PacingAndBuckets))
        .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics-chart.svg");
    std::fs::write(path, svg_chart(&chart, &accelerating))?;
    println!("wrote {path}");
    Ok(())
}
