//! Predictive throttling against MockClaude with rising demand (paused time).
#![cfg(all(feature = "testing", feature = "metrics"))]

use tower_claude::metrics::simulation::{SimConfig, SimReport, Strategy, simulate, table};

async fn run_all(config: &SimConfig) -> Vec<SimReport> {
    let mut reports = Vec::new();
    for strategy in Strategy::ALL {
        reports.push(simulate(strategy, config).await);
    }
    reports
}

#[tokio::test(start_paused = true)]
async fn print_numbers() {
    let config = SimConfig::default();
    let reports = run_all(&config).await;
    println!("{}", table(&reports));
    let shared = SimConfig { background_rpm: 12.0, ..SimConfig::default() };
    let reports = run_all(&shared).await;
    println!("{}", table(&reports));
}
