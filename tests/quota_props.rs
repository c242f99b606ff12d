//! Property tests of the quota board under random workloads (paused time).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;
use tower_claude::anthropic::{KeyId, RateLimitGroup};
use tower_claude::quota::{Cost, Limits, QuotaBoard, TokenBucket};

#[derive(Debug, Clone)]
struct Req {
    /// Arrival after the previous request.
    gap_ms: u64,
    input: u64,
    max_tokens: u64,
    /// Actual output as a per-mille of the reservation.
    used_permille: u64,
    /// How long the response takes (a stream may last longer than a minute).
    hold_ms: u64,
    /// Give up waiting after this long (None: wait).
    max_wait_ms: Option<u64>,
    /// The request never reaches the server.
    refund: bool,
}

fn req() -> impl Strategy<Value = Req> {
    (
        0u64..3_000,
        1u64..4_000,
        1u64..6_000,
        0u64..=1_000,
        0u64..90_000,
        proptest::option::weighted(0.2, 0u64..20_000),
        proptest::bool::weighted(0.1),
    )
        .prop_map(
            |(gap_ms, input, max_tokens, used_permille, hold_ms, max_wait_ms, refund)| Req {
                gap_ms,
                input,
                max_tokens,
                used_permille,
                hold_ms,
                max_wait_ms,
                refund,
            },
        )
}

/// Net units taken from one bucket: + at admission, - at refund, + for an overrun.
type Ledger = Arc<Mutex<Vec<(Instant, [i64; 3])>>>;

fn max_window(events: &[(Instant, [i64; 3])], bucket: usize, window: Duration) -> i64 {
    let mut best = i64::MIN;
    for (i, (start, _)) in events.iter().enumerate() {
        let sum: i64 = events[i..]
            .iter()
            .take_while(|(t, _)| t.duration_since(*start) < window)
            .map(|(_, d)| d[bucket])
            .sum();
        best = best.max(sum);
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// In any 60 s window, what the board lets through (net of refunds) never exceeds
    /// limit + capacity, in each of the three buckets; and when everything is settled and the
    /// board idles for a minute, it is full again with nothing queued or in flight.
    #[test]
    fn any_minute_admits_at_most_limit_plus_capacity(reqs in proptest::collection::vec(req(), 1..120)) {
        let limits = Limits::new(30, 20_000, 8_000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (windows, idle_fraction, in_flight, queued) = rt.block_on(async move {
            let group = RateLimitGroup::new("g");
            let key = KeyId::named("k");
            let board = QuotaBoard::builder().limits(group.clone(), limits).build();
            let ledger: Ledger = Arc::default();
            let mut tasks = Vec::new();
            for r in reqs {
                tokio::time::sleep(Duration::from_millis(r.gap_ms)).await;
                let board = board.clone();
                let ledger = ledger.clone();
                let (key, group) = (key.clone(), group.clone());
                tasks.push(tokio::spawn(async move {
                    let cost = Cost::new(1, r.input, r.max_tokens);
                    let acquire = board.acquire(key, group, cost);
                    let acquire = match r.max_wait_ms {
                        Some(ms) => acquire.max_wait(Duration::from_millis(ms)),
                        None => acquire,
                    };
                    let Ok(res) = acquire.await else { return };
                    let charged = res.charged();
                    ledger.lock().unwrap().push((
                        Instant::now(),
                        [charged.requests as i64, charged.input_tokens as i64, charged.output_tokens as i64],
                    ));
                    tokio::time::sleep(Duration::from_millis(r.hold_ms)).await;
                    if r.refund {
                        ledger.lock().unwrap().push((
                            Instant::now(),
                            [-(charged.requests as i64), -(charged.input_tokens as i64), -(charged.output_tokens as i64)],
                        ));
                        res.refund();
                    } else {
                        let out = charged.output_tokens * r.used_permille / 1_000;
                        ledger.lock().unwrap().push((
                            Instant::now(),
                            [0, 0, out as i64 - charged.output_tokens as i64],
                        ));
                        res.settle(Cost::new(1, charged.input_tokens, out));
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let mut events = ledger.lock().unwrap().clone();
            events.sort_by_key(|(t, _)| *t);
            let w = Duration::from_secs(60);
            let windows = [
                max_window(&events, 0, w),
                max_window(&events, 1, w),
                max_window(&events, 2, w),
            ];
            tokio::time::sleep(Duration::from_secs(61)).await;
            let h = board.headroom(&KeyId::named("k"), &RateLimitGroup::new("g")).unwrap();
            let status = board.statuses().remove(0);
            (windows, h.fraction, status.in_flight, status.queue_depth)
        });
        let caps = limits_array(limits);
        for b in 0..3 {
            prop_assert!(windows[b] <= 2 * caps[b], "bucket {b}: {} > {}", windows[b], 2 * caps[b]);
        }
        prop_assert_eq!(idle_fraction, 1.0);
        prop_assert_eq!(in_flight, 0);
        prop_assert_eq!(queued, 0);
    }

    /// Bucket maths: after waiting `time_until(n)`, `n` units can be taken; a moment before,
    /// they cannot.
    #[test]
    fn time_until_is_exact(cap in 1u64..1_000_000, take in 0u64..1_000_000, n in 0u64..1_000_000) {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(cap, t0);
        b.force_take(take, t0);
        match b.time_until(n, t0) {
            None => prop_assert!(n > cap),
            Some(d) => {
                prop_assert!(b.clone().try_take(n, t0 + d).is_ok());
                if d > Duration::from_micros(1) {
                    prop_assert!(b.clone().try_take(n, t0 + d - Duration::from_micros(1)).is_err());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    /// Issue 18, bug 3: whatever usage is settled (up to `u64::MAX` tokens, as a broken
    /// upstream may report), a bucket's debt is bounded by one capacity: a request that fits
    /// the capacity waits at most the debt's refill (one minute) plus its own (one more), and
    /// the board is full again two minutes later.
    #[test]
    fn settled_usage_never_drains_a_bucket_for_more_than_its_refill(
        settled in proptest::collection::vec((0u64..=u64::MAX, 0u64..=u64::MAX, proptest::bool::ANY), 1..6),
        input in 0u64..=20_000,
        output in 0u64..=8_000,
    ) {
        let limits = Limits::new(30, 20_000, 8_000);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (wait, full_in, after) = rt.block_on(async move {
            let group = RateLimitGroup::new("g");
            let key = KeyId::named("k");
            let board = QuotaBoard::builder().limits(group.clone(), limits).build();
            for (i, o, huge) in settled {
                // Bounded, so that a board in debt for years fails the test rather than
                // hanging it.
                let Ok(res) = board
                    .acquire(key.clone(), group.clone(), Cost::new(1, 10, 10))
                    .max_wait(Duration::from_secs(240))
                    .await
                else {
                    break;
                };
                let (i, o) = if huge { (u64::MAX, u64::MAX) } else { (i, o) };
                res.settle(Cost::new(1, i, o));
            }
            let cost = Cost::new(1, input, output);
            let wait = board.time_until_fits(&key, &group, &cost).unwrap();
            let full_in = board.headroom(&key, &group).unwrap().full_in;
            tokio::time::sleep(Duration::from_secs(120)).await;
            let after = board.headroom(&key, &group).unwrap().fraction;
            (wait, full_in, after)
        });
        prop_assert!(wait <= Duration::from_secs(120), "wait {wait:?}");
        prop_assert!(full_in <= Duration::from_secs(120), "full in {full_in:?}");
        prop_assert_eq!(after, 1.0);
    }
}

fn limits_array(l: Limits) -> [i64; 3] {
    [l.rpm as i64, l.itpm as i64, l.otpm as i64]
}
