//! Runs the rising-demand simulation (MockClaude, paused time) through four stacks and writes
//! `docs/metrics-chart.svg` and the comparison table shown in `docs/metrics.md`.
//!
//! ```text
//! cargo run --example metrics_chart --features testing,metrics
//! ```

use tower_claude::metrics::simulation::{SimConfig, Strategy, simulate, svg_chart, table};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> std::io::Result<()> {
    let config = SimConfig::default();
    let mut reports = Vec::new();
    for strategy in Strategy::ALL {
        reports.push(simulate(strategy, &config).await);
    }
    println!("Alone on the key ({config:?}):\n\n{}", table(&reports));

    let shared = SimConfig {
        background_rpm: 12.0,
        ..SimConfig::default()
    };
    let mut shared_reports = Vec::new();
    for strategy in Strategy::ALL {
        shared_reports.push(simulate(strategy, &shared).await);
    }
    println!(
        "Sharing the key with 12 RPM of other traffic:\n\n{}",
        table(&shared_reports)
    );

    let bursty = SimConfig {
        poisson: true,
        short_window: Some(std::time::Duration::from_secs(10)),
        ..SimConfig::default()
    };
    let mut bursty_reports = Vec::new();
    for strategy in Strategy::ALL {
        bursty_reports.push(simulate(strategy, &bursty).await);
    }
    println!(
        "Poisson arrivals, upstream also enforcing the RPM over 10 s windows:\n\n{}",
        table(&bursty_reports)
    );

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics-chart.svg");
    std::fs::write(path, svg_chart(&reports, &config))?;
    println!("wrote {path}");
    Ok(())
}
