//! Issue 12's scale scenario in process (paused time, `testing::scale`): one key must not
//! lose what the upstream's limits allow, and two keys must use both.
#![cfg(feature = "testing")]

use std::time::Duration;

use tower_claude::testing::scale::{ScaleConfig, ScaleReport, run};

fn check(report: &ScaleReport, max_ratio: f64) {
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.upstream_429, 0, "{report:?}");
    assert!(
        report.ratio() <= max_ratio,
        "{:.3}x: {report:?}",
        report.ratio()
    );
}

/// One key, 500 ms answers: the answers' `remaining` predates the refunds of the answers
/// that ended meanwhile. Lowering the level to it lost those refunds (54.4 s against an
/// ideal of 40 s at 9e1570c, 1.36x; 41.2 s now; a client that knew the server's buckets
/// exactly, serving in arrival order, would take about 41 s: the output bucket, reserved
/// from `max_tokens`, binds too).
#[tokio::test(start_paused = true)]
async fn one_key_with_slow_answers_loses_no_refund_to_stale_headers() {
    let report = run(&ScaleConfig::default()).await;
    check(&report, 1.06);
}

/// One key, answers at once (the 40.5 s, 0.99 of the ideal).
#[tokio::test(start_paused = true)]
async fn one_key_with_instant_answers_reaches_the_ideal() {
    let config = ScaleConfig {
        latency: Duration::ZERO,
        ..ScaleConfig::default()
    };
    check(&run(&config).await, 1.02);
}

/// Two and four keys, one fleet each behind one stack: every key is used to its limits
/// (two keys took 53.3 s at 9e1570c; 41.8 s and 41.9 s now), evenly. The fleets of one
/// stack finish in the order they started, about a second apart with four (FIFO across the
/// fleets' closed loops): 6.6-7.6 % apart over `SEED` 1-8 at f0b6a54, 6.6-8.1 % since the
/// request level keeps its fraction (issue 12, ninth pass: the first fleet ends 38.7 ->
/// 38.5 s with seed 1, the last at 41.9 s either way), hence 8.5 %.
#[tokio::test(start_paused = true)]
async fn every_key_is_used_to_its_limits() {
    for keys in [2, 4] {
        let config = ScaleConfig {
            keys,
            ..ScaleConfig::default()
        };
        let report = run(&config).await;
        check(&report, 1.06);
        let first = report.fleets.iter().min().unwrap();
        let last = report.fleets.iter().max().unwrap();
        let spread = (*last - *first).as_secs_f64() / last.as_secs_f64();
        assert!(spread <= 0.085, "fleets {:?}", report.fleets);
        let fair = config.tasks_per_fleet;
        assert!(
            report.per_key.iter().all(|&n| n.abs_diff(fair) <= 3),
            "{:?}",
            report.per_key
        );
    }
}

/// Issue 12, seventh pass: answers slower than the probe grace (3 s, as real answers are),
/// the output bucket binding. The requests queued behind the slow probe go blind in a ramp
/// (one after the 2 s grace, and the probe's answer at 3 s teaches the limits) instead of
/// all at once: none is refused upstream (1 with the whole queue let through at once here,
/// 7 of 200 over HTTP), and the runs stay close to the exact FIFO client's bound for these
/// tasks (81.0 s, `scripts/fifo-bound.py --slow`): 87.4 s with one key, 86.3 s with two.
#[tokio::test(start_paused = true)]
async fn slow_answers_behind_a_slow_probe_take_no_429() {
    for keys in [1, 2] {
        let config = ScaleConfig {
            keys,
            latency: Duration::from_secs(3),
            ..ScaleConfig::default()
        };
        // 2.2 × the request ideal (40 s): 88 s, 1.09× the bound.
        check(&run(&config).await, 2.2);
    }
}
