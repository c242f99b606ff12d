//! The Redis quota backend against a real `redis-server` started on a free port: two boards
//! share one limit (and double it without Redis), an outage is limited locally with a share
//! and recovers, headers re-seed across nodes, fail closed.
//!
//! Redis keeps time with its own clock, so these tests run in real time with short phases
//! (a few seconds in all). Without `redis-server` on the PATH they are skipped with a message,
//! unless `CI` is set, where they fail.
#![cfg(feature = "redis")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::redis_server::RedisServer;
use tokio::time::Instant;
use tower_claude::anthropic::{BucketSnapshot, KeyId, RateLimitGroup, RateLimitSnapshot};
use tower_claude::quota::{AcquireErrorKind, Cost, Limits, QuotaBoard, RedisOptions};

/// A bucket's view in an answer's headers: its limit and what remains, no reset.
fn view(limit: u64, remaining: u64) -> BucketSnapshot {
    BucketSnapshot {
        limit: Some(limit),
        remaining: Some(remaining),
        reset: None,
    }
}

fn group() -> RateLimitGroup {
    RateLimitGroup::new("claude-haiku-4-5")
}

fn key() -> KeyId {
    KeyId::named("shared-key")
}

fn options(prefix: &str) -> RedisOptions {
    RedisOptions::new()
        .key_prefix(prefix)
        .expected_nodes(2)
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(100))
        .probe_interval(Duration::from_millis(50))
}

async fn redis_board(url: &str, prefix: &str, rpm: u64) -> QuotaBoard {
    QuotaBoard::builder()
        .limits(group(), Limits::new(rpm, 1_000_000, 1_000_000))
        .build_redis(url, options(prefix))
        .await
        .unwrap()
}

/// [`redis_board`] with a 2 s reply timeout, for tests that count shared grants: 100 ms on a
/// loaded machine would put a call on the outage fallback.
async fn patient_redis_board(url: &str, prefix: &str, rpm: u64) -> QuotaBoard {
    QuotaBoard::builder()
        .limits(group(), Limits::new(rpm, 1_000_000, 1_000_000))
        .build_redis(
            url,
            options(prefix).response_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap()
}

/// A Redis board with no configured limits: it learns them from headers (or from Redis).
async fn learning_board(url: &str, options: RedisOptions) -> QuotaBoard {
    QuotaBoard::builder()
        .build_redis(url, options)
        .await
        .unwrap()
}

/// What one node saw in a phase.
#[derive(Debug, Default)]
struct Tally {
    admitted: AtomicU64,
    limited: AtomicU64,
    failed: AtomicU64,
    slowest_ms: AtomicU64,
}

/// Acquires one request at a time on `board` for `run`, each waiting at most 20 ms, and
/// settles what it got.
async fn hammer(board: QuotaBoard, run: Duration, tally: Arc<Tally>) {
    let end = Instant::now() + run;
    while Instant::now() < end {
        let started = Instant::now();
        let got = board
            .acquire(key(), group(), Cost::new(1, 10, 10))
            .max_wait(Duration::from_millis(20))
            .await;
        let ms = started.elapsed().as_millis() as u64;
        tally.slowest_ms.fetch_max(ms, Ordering::Relaxed);
        match got {
            Ok(reservation) => {
                tally.admitted.fetch_add(1, Ordering::Relaxed);
                reservation.settle(Cost::new(1, 10, 10));
            }
            Err(e) if e.kind() == AcquireErrorKind::QueueTimeout => {
                tally.limited.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `hammer` on both boards in separate tasks; returns their tallies.
async fn both(a: &QuotaBoard, b: &QuotaBoard, run: Duration) -> (Arc<Tally>, Arc<Tally>) {
    let (ta, tb) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let ha = tokio::spawn(hammer(a.clone(), run, ta.clone()));
    let hb = tokio::spawn(hammer(b.clone(), run, tb.clone()));
    ha.await.unwrap();
    hb.await.unwrap();
    (ta, tb)
}

fn admitted(t: &Tally) -> u64 {
    t.admitted.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boards_never_admit_more_than_the_limit_together() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let rpm = 30;
    // Patient boards: a reply later than 100 ms on a loaded machine would put a call on the
    // outage fallback (each node's local share), which this test does not measure.
    let a = patient_redis_board(&server.url(), "t1:", rpm).await;
    let b = patient_redis_board(&server.url(), "t1:", rpm).await;
    let start = Instant::now();
    let (ta, tb) = both(&a, &b, Duration::from_millis(800)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let together = admitted(&ta) + admitted(&tb);
    // The burst plus what refilled meanwhile (30 per minute).
    let bound = rpm + (rpm as f64 * elapsed / 60.0).ceil() as u64;
    assert!(together <= bound, "{together} > {bound}");
    assert!(together >= rpm, "{together} < {rpm}");
    // Both nodes were asking all along (which one wins the burst is a race).
    for t in [&ta, &tb] {
        assert!(t.limited.load(Ordering::Relaxed) > 0, "{t:?}");
    }
    assert_eq!(
        ta.failed.load(Ordering::Relaxed) + tb.failed.load(Ordering::Relaxed),
        0
    );
    assert!(format!("{a:?}").contains("redis"));
    let (sa, sb) = (a.redis_status().unwrap(), b.redis_status().unwrap());
    assert!(!sa.degraded && !sb.degraded);
    assert_eq!(sa.shared_grants + sb.shared_grants, together);
    // The mirror shows the shared level without a round trip.
    let left = a
        .headroom(&key(), &group())
        .unwrap()
        .requests
        .unwrap()
        .remaining;
    assert!(left <= 1, "{left}");

    // The same workload on two in-process boards: each admits the whole limit.
    let local = || {
        QuotaBoard::builder()
            .limits(group(), Limits::new(rpm, 1_000_000, 1_000_000))
            .build()
    };
    let (la, lb) = both(&local(), &local(), Duration::from_millis(800)).await;
    let alone = admitted(&la) + admitted(&lb);
    assert!(alone >= 2 * rpm, "{alone}");
    assert!(alone <= 2 * bound, "{alone}");
    eprintln!("admitted together: {together} with Redis, {alone} without (limit {rpm}/min)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_limits_locally_then_shared_state_resumes() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let rpm = 40;
    let a = redis_board(&server.url(), "t2:", rpm).await;
    let b = redis_board(&server.url(), "t2:", rpm).await;

    // Redis up: one shared limit.
    let (ta, tb) = both(&a, &b, Duration::from_millis(300)).await;
    let phase1 = admitted(&ta) + admitted(&tb);
    assert!(phase1 <= rpm + 1, "{phase1}");
    assert!(phase1 >= rpm - 1, "{phase1}");

    // Redis killed mid-run: nothing fails, each node limits itself to its share (20).
    server.stop();
    let (ta, tb) = both(&a, &b, Duration::from_millis(500)).await;
    for t in [&ta, &tb] {
        assert_eq!(t.failed.load(Ordering::Relaxed), 0, "{t:?}");
        assert!(admitted(t) <= rpm / 2 + 1, "{t:?}");
        assert!(admitted(t) >= rpm / 2 - 1, "{t:?}");
        // No request hangs on the dead server: at most the wait bound plus one timeout.
        assert!(t.slowest_ms.load(Ordering::Relaxed) < 500, "{t:?}");
    }
    for board in [&a, &b] {
        let s = board.redis_status().unwrap();
        assert!(s.degraded, "{s:?}");
        assert_eq!(s.outages, 1);
        assert!(s.fallback_acquires > 0);
        assert!((s.local_share - 0.5).abs() < 1e-9);
    }

    // Restarted (empty): both boards find it again and share one limit again.
    server.restart();
    let waited = Instant::now();
    while a.redis_status().unwrap().degraded || b.redis_status().unwrap().degraded {
        assert!(waited.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = a.redis_status().unwrap().shared_grants + b.redis_status().unwrap().shared_grants;
    let (ta, tb) = both(&a, &b, Duration::from_millis(300)).await;
    let phase3 = admitted(&ta) + admitted(&tb);
    assert!(phase3 <= rpm + 1, "{phase3}");
    assert!(phase3 >= rpm - 1, "{phase3}");
    let after = a.redis_status().unwrap().shared_grants + b.redis_status().unwrap().shared_grants;
    assert_eq!(after - before, phase3, "every grant came from Redis");
    assert_eq!(a.redis_status().unwrap().recoveries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_seen_by_one_node_limit_the_other() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Generous timeouts: a slow reply on a loaded machine must not send a node to its local
    // share, which is not what this test is about.
    let patient = || options("t3:").response_timeout(Duration::from_secs(2));
    let url = server.url();
    let board = || {
        QuotaBoard::builder()
            .limits(group(), Limits::new(50, 1_000_000, 1_000_000))
            .build_redis(&url, patient())
    };
    let a = board().await.unwrap();
    let b = board().await.unwrap();
    // Warm both mirrors.
    a.acquire(key(), group(), Cost::new(1, 0, 0))
        .await
        .unwrap()
        .settle(Cost::new(1, 0, 0));
    // Node A learns from the server that only 3 requests are left.
    let snap = RateLimitSnapshot {
        requests: view(50, 3),
        ..Default::default()
    };
    a.observe(&key(), &group(), &snap);
    tokio::time::sleep(Duration::from_millis(500)).await; // the re-seed is sent in the background
    let mut got = 0;
    for _ in 0..10 {
        match b
            .acquire(key(), group(), Cost::new(1, 0, 0))
            .max_wait(Duration::from_millis(10))
            .await
        {
            Ok(r) => {
                got += 1;
                r.settle(Cost::new(1, 0, 0));
            }
            Err(e) => assert_eq!(e.kind(), AcquireErrorKind::QueueTimeout),
        }
    }
    assert_eq!(got, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_while_redis_is_down() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.stop();
    let board = QuotaBoard::builder()
        .limits(group(), Limits::new(10, 1_000, 1_000))
        .build_redis(&server.url(), options("t4:").fail_closed(true))
        .await
        .unwrap();
    assert!(board.redis_status().unwrap().degraded);
    let err = board
        .acquire(key(), group(), Cost::new(1, 1, 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), AcquireErrorKind::BackendUnavailable);
    server.restart();
    let waited = Instant::now();
    while board.redis_status().unwrap().degraded {
        assert!(waited.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    board
        .acquire(key(), group(), Cost::new(1, 1, 1))
        .await
        .unwrap()
        .settle(Cost::new(1, 1, 1));
    assert_eq!(board.redis_status().unwrap().shared_grants, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_reach_every_node_and_wake_local_waiters() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = patient_redis_board(&server.url(), "t5:", 2).await;
    let b = patient_redis_board(&server.url(), "t5:", 2).await;
    // Waits of 200 ms: long enough for a Redis round trip on a loaded machine, far shorter
    // than the refill (one unit in 30 s), so a refused take still proves nothing was free.
    let take = |board: &QuotaBoard, wait_ms: u64| {
        board
            .acquire(key(), group(), Cost::new(1, 0, 0))
            .max_wait(Duration::from_millis(wait_ms))
    };
    let r1 = take(&a, 200).await.unwrap();
    let r2 = take(&a, 200).await.unwrap();
    assert_eq!(
        take(&b, 200).await.unwrap_err().kind(),
        AcquireErrorKind::QueueTimeout
    );

    // A waiter on the same node is woken by the refund (the refill alone takes 30 s).
    let a2 = a.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = take(&a2, 2_000).await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    r1.refund();
    let (r, waited) = waiter.await.unwrap();
    r.unwrap().refund();
    assert!(waited < Duration::from_millis(1_000), "{waited:?}");

    // The refunded unit is in Redis: the other node gets it; the dropped reservation stays
    // charged.
    tokio::time::sleep(Duration::from_millis(50)).await;
    take(&b, 200).await.unwrap().settle(Cost::new(1, 0, 0));
    drop(r2);
    assert_eq!(
        take(&b, 200).await.unwrap_err().kind(),
        AcquireErrorKind::QueueTimeout
    );
}

/// Two rate-limited stacks (two proxy nodes) over one upstream: with a Redis board each,
/// upstream never answers 429; with in-process boards the nodes only learn of each other from
/// upstream's `remaining` headers, and upstream has to refuse what they send too many.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rate_limited_nodes_share_the_upstream_limit() {
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_claude::body::RequestBody;
    use tower_claude::rate_limit::RateLimitLayer;
    use tower_claude::testing::{MockClaude, MockLimits};

    let Some(server) = RedisServer::start() else {
        return;
    };
    let rpm = 10;
    let limits = MockLimits {
        rpm,
        itpm: 1_000_000,
        otpm: 1_000_000,
    };
    let request = || {
        http::Request::post("https://api.anthropic.com/v1/messages")
            .header("x-api-key", "sk-ant-shared")
            .header("anthropic-version", "2023-06-01")
            .body(RequestBody::from(
                r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
            ))
            .unwrap()
    };
    let mut outcome = Vec::new();
    for shared in [true, false] {
        let mock = MockClaude::builder().default_limits(limits).build();
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let builder =
                QuotaBoard::builder().default_limits(Limits::new(rpm, 1_000_000, 1_000_000));
            let board = if shared {
                builder
                    .build_redis(&server.url(), options("t6:"))
                    .await
                    .unwrap()
            } else {
                builder.build()
            };
            nodes.push(
                ServiceBuilder::new()
                    .layer(
                        RateLimitLayer::new()
                            .board(board)
                            .max_wait(Duration::from_millis(20)),
                    )
                    .service(mock.clone()),
            );
        }
        for i in 0..3 * rpm as usize {
            let node = &mut nodes[i % 2];
            match node.ready().await.unwrap().call(request()).await {
                Ok(res) => {
                    use http_body_util::BodyExt;
                    res.into_body().collect().await.unwrap();
                }
                Err(e) => {
                    let e = e
                        .downcast_ref::<tower_claude::quota::AcquireError>()
                        .unwrap();
                    assert_eq!(e.kind(), AcquireErrorKind::QueueTimeout);
                }
            }
        }
        let stats = mock.stats();
        outcome.push((
            stats.by_status.get(&200).copied().unwrap_or(0),
            stats.by_status.get(&429).copied().unwrap_or(0),
        ));
    }
    let (ok_shared, refused_shared) = outcome[0];
    let (ok_local, refused_local) = outcome[1];
    assert_eq!(refused_shared, 0, "{outcome:?}");
    assert!(ok_shared >= rpm - 1 && ok_shared <= rpm + 1, "{outcome:?}");
    assert!(ok_local <= rpm + 1, "{outcome:?}");
    assert!(refused_local >= 1, "{outcome:?}");
}

/// No configured limits and two nodes starting cold at once: one node takes the learning lock
/// and sends the only probe; every other request, on both nodes, waits until its headers have
/// reached Redis (which then counts the probe) and takes its quota there. Granted from a
/// node-local copy instead, or after a probe per node, the nodes would admit more than the
/// limit together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_nodes_send_one_probe_and_enforce_learned_limits_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let limit = 10;
    let a = learning_board(&server.url(), options("t7:")).await;
    let b = learning_board(&server.url(), options("t7:")).await;
    // Node A asks first: it learns the limits.
    let probe = a
        .acquire(key(), group(), Cost::new(1, 10, 10))
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for board in [&a, &b] {
        // Nothing fits at once while the limits are being learned.
        let err = board
            .try_acquire(&key(), &group(), Cost::new(1, 10, 10))
            .unwrap_err();
        assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
        for _ in 0..limit {
            let board = board.clone();
            waiters.push(tokio::spawn(async move {
                board
                    .acquire(key(), group(), Cost::new(1, 10, 10))
                    .max_wait(Duration::from_millis(800))
                    .await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "every other request waits for the probe's answer"
    );
    assert!(
        b.headroom(&key(), &group()).is_none(),
        "nothing learned yet"
    );
    // The probe's answer: 9 left. (Observed as the probe's: headers from nowhere in
    // particular, seen while the probe is out, may not count it, and the probe is then
    // charged too, issue 12, seventh pass.)
    probe.observe(&RateLimitSnapshot {
        requests: view(limit, limit - 1),
        ..Default::default()
    });
    probe.settle(Cost::new(1, 10, 10));
    let mut admitted = 0;
    for w in waiters {
        match w.await.unwrap() {
            Ok(r) => {
                admitted += 1;
                r.settle(Cost::new(1, 10, 10));
            }
            Err(e) => assert_eq!(e.kind(), AcquireErrorKind::QueueTimeout),
        }
    }
    // One probe plus what Redis admitted: the limit (plus what refilled in the meantime, 10
    // a minute: at most one).
    eprintln!("admitted {admitted} behind one probe (limit {limit})");
    assert!(
        (limit - 1..=limit).contains(&admitted),
        "admitted {admitted} behind the probe"
    );
    let grants = a.redis_status().unwrap().shared_grants + b.redis_status().unwrap().shared_grants;
    assert_eq!(grants, admitted, "every waiter was admitted by Redis");
    assert!(
        b.headroom(&key(), &group()).is_some(),
        "node B adopted the limits"
    );
}

/// The node that holds the learning lock dies (its probe never answers): the lock expires and
/// another node learns the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learning_lock_outlives_no_dead_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let opts = || options("t10:").learn_lock_ttl(Duration::from_millis(300));
    let a = learning_board(&server.url(), opts()).await;
    let b = learning_board(&server.url(), opts()).await;
    // A takes the lock with its probe, then is gone for good (the reservation is forgotten,
    // as in a process that crashed: nothing is released).
    let probe = a.acquire(key(), group(), Cost::new(1, 1, 1)).await.unwrap();
    std::mem::forget(probe);
    drop(a);
    let start = Instant::now();
    let b_probe = b
        .acquire(key(), group(), Cost::new(1, 1, 1))
        .max_wait(Duration::from_secs(5))
        .await
        .expect("B learns once the lock expires");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    drop(b_probe);
}

/// A probe whose answer teaches nothing (an error without headers) releases the lock at once:
/// the next request, on any node, learns instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_teaches_nothing_releases_the_learning_lock() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = learning_board(&server.url(), options("t11:")).await;
    let b = learning_board(&server.url(), options("t11:")).await;
    let probe = a.acquire(key(), group(), Cost::new(1, 1, 1)).await.unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move {
            b.acquire(key(), group(), Cost::new(1, 1, 1))
                .max_wait(Duration::from_secs(5))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    let start = Instant::now();
    probe.settle_rejected();
    waiting.await.unwrap().expect("B learns next");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// Limits one node learned from the headers are adopted by the others from Redis: a node
/// that starts later does not probe, so a group is never sent more than the limit plus the
/// first node's probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_adopts_limits_learned_by_another_instead_of_probing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = || options("t8:").response_timeout(Duration::from_secs(2));
    let a = learning_board(&server.url(), patient()).await;
    let limit = 10;
    // Node A probes and learns 10 rpm, 9 left (the probe's answer: its count holds it).
    let probe = a
        .acquire(key(), group(), Cost::new(1, 10, 10))
        .await
        .unwrap();
    probe.observe(&RateLimitSnapshot {
        requests: view(limit, limit - 1),
        ..Default::default()
    });
    probe.settle(Cost::new(1, 10, 10));
    // Wait for the background seed to reach Redis: the hash then holds the capacities.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("t8:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut caps: Option<u64> = None;
        // The buckets' hash (not the learning lock beside it).
        if let Some(k) = keys.iter().find(|k| !k.ends_with(":learn")) {
            caps = redis::cmd("HGET")
                .arg(k)
                .arg("c1")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        if caps.is_some() {
            assert_eq!(caps, Some(limit), "the learned request limit is stored");
            break;
        }
        assert!(Instant::now() < deadline, "the seed never reached Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Node B starts later, knowing nothing. A burst of 20: no probe, Redis admits what is left.
    let b = learning_board(&server.url(), patient()).await;
    assert!(b.headroom(&key(), &group()).is_none());
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                b.acquire(key(), group(), Cost::new(1, 10, 10))
                    .max_wait(Duration::from_millis(300))
                    .await
            })
        })
        .collect();
    let mut admitted = 0;
    for t in burst {
        match t.await.unwrap() {
            Ok(r) => {
                admitted += 1;
                r.settle(Cost::new(1, 10, 10));
            }
            Err(e) => assert_eq!(e.kind(), AcquireErrorKind::QueueTimeout),
        }
    }
    // 9 left, plus what refilled meanwhile (10 rpm: one per 6 s), at most one.
    assert!(
        (limit - 1..=limit).contains(&admitted),
        "admitted {admitted} on the second node"
    );
    let status = b.redis_status().unwrap();
    assert_eq!(
        status.shared_grants, admitted,
        "every request of node B was admitted by Redis (no local probe)"
    );
    let h = b.headroom(&key(), &group()).expect("limits adopted");
    assert_eq!(h.requests.unwrap().limit, limit);
    assert!(
        !b.statuses()[0].configured,
        "adopted limits are learned, not configured"
    );
}

/// Requests admitted by Redis are counted in flight until settled (the proxy's status page
/// reads it), and a settled reservation no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_admitted_by_redis_are_counted_in_flight() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let board = patient_redis_board(&server.url(), "t9:", 50).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            board
                .acquire(key(), group(), Cost::new(1, 1, 1))
                .await
                .unwrap(),
        );
    }
    assert_eq!(board.redis_status().unwrap().shared_grants, 3);
    assert_eq!(board.statuses()[0].in_flight, 3);
    held.pop().unwrap().settle(Cost::new(1, 1, 1));
    held.pop().unwrap().refund();
    assert_eq!(board.statuses()[0].in_flight, 1);
    drop(held);
    assert_eq!(board.statuses()[0].in_flight, 0);
}

/// A node with configured limits creates the `(key, group)` hash in Redis with its capacities,
/// so a node that learns limits from headers adopts them without a probe (also after the hash
/// expired and was created again by an acquire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_created_by_an_acquire_carries_the_capacities() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = || options("t12:").response_timeout(Duration::from_secs(2));
    let configured = patient_redis_board(&server.url(), "t12:", 30).await;
    configured
        .acquire(key(), group(), Cost::new(1, 1, 1))
        .await
        .unwrap()
        .settle(Cost::new(1, 1, 1));
    let learning = learning_board(&server.url(), patient()).await;
    let r = learning
        .acquire(key(), group(), Cost::new(1, 1, 1))
        .max_wait(Duration::from_secs(2))
        .await
        .expect("adopted, no probe to wait for");
    r.settle(Cost::new(1, 1, 1));
    assert_eq!(learning.redis_status().unwrap().shared_grants, 1);
    let h = learning.headroom(&key(), &group()).unwrap();
    assert_eq!(h.requests.unwrap().limit, 30);
}

/// Issue 18, bugs 2 and 3 with Redis: an answer saying `limit: 0` teaches no node anything
/// (the same header parse feeds both backends), and a usage of `u64::MAX` tokens puts the
/// shared bucket at most one capacity in debt (the Redis script bounds it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_headers_and_usage_do_not_lock_out_redis_nodes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let patient = |prefix: &str| options(prefix).response_timeout(Duration::from_secs(2));

    // Limit 0: nothing is learned, on either node.
    let a = learning_board(&url, patient("t18a:")).await;
    let b = learning_board(&url, patient("t18a:")).await;
    let mut headers = http::HeaderMap::new();
    for name in [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-output-tokens-limit",
    ] {
        headers.insert(name, http::HeaderValue::from_static("0"));
    }
    let probe = a
        .acquire(key(), group(), Cost::new(1, 100, 100))
        .await
        .unwrap();
    a.observe(&key(), &group(), &RateLimitSnapshot::from_headers(&headers));
    probe.settle(Cost::new(1, 100, 100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for board in [&a, &b] {
        for _ in 0..3 {
            board
                .acquire(key(), group(), Cost::new(1, 100, 100))
                .max_wait(Duration::from_secs(1))
                .await
                .expect("not locked out")
                .settle(Cost::new(1, 100, 100));
        }
    }

    // u64::MAX usage on a configured shared bucket: the next request waits at most two
    // refill periods, not centuries.
    let c = redis_board(&url, "t18b:", 100).await;
    c.acquire(key(), group(), Cost::new(1, 10, 10))
        .await
        .unwrap()
        .settle(Cost::new(1, u64::MAX, u64::MAX));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = c
        .acquire(key(), group(), Cost::new(1, 10, 10))
        .max_wait(Duration::from_millis(10))
        .await
        .expect_err("in debt");
    assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
    let wait = err.available_in().expect("a known wait");
    assert!(wait <= Duration::from_secs(120), "{wait:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_unequal_demand_are_served_in_arrival_order() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // 60 a minute: one request a second once the bucket is empty.
    let rpm = 60;
    let a = redis_board(&server.url(), "t-order:", rpm).await;
    let b = redis_board(&server.url(), "t-order:", rpm).await;
    for _ in 0..rpm {
        a.acquire(key(), group(), Cost::new(1, 1, 1))
            .await
            .unwrap()
            .keep();
    }
    // Node a is busy (five waiters), node b has one, arriving between a's third and fourth.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, board) in [
        ("a1", &a),
        ("a2", &a),
        ("a3", &a),
        ("b1", &b),
        ("a4", &a),
        ("a5", &a),
    ] {
        let (board, order) = (board.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let r = board
                .acquire(key(), group(), Cost::new(1, 1, 1))
                .await
                .unwrap();
            order.lock().unwrap().push(name);
            r.keep();
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("every waiter is served")
            .unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["a1", "a2", "a3", "b1", "a4", "a5"],
        "first come, first served across nodes"
    );
}

#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_loses_no_request() {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_claude::body::RequestBody;
    use tower_claude::key_pool::KeyPoolLayer;
    use tower_claude::rate_limit::RateLimitLayer;
    use tower_claude::testing::{MockClaude, MockLimits};

    let Some(mut server) = RedisServer::start() else {
        return;
    };
    // Two keys of 60 a minute through Redis, one node: 120 go out at once, then two a second.
    let board = QuotaBoard::builder()
        .default_limits(Limits::new(60, 1_000_000, 1_000_000))
        .build_redis(&server.url(), options("t-kill:").expected_nodes(1))
        .await
        .unwrap();
    let mock = MockClaude::builder()
        .default_limits(MockLimits::new(1_000, 10_000_000, 10_000_000))
        .latency(Duration::from_millis(20), Duration::ZERO)
        .output_tokens(5)
        .build();
    let svc = ServiceBuilder::new()
        .layer(
            KeyPoolLayer::new(["sk-ant-kill-a", "sk-ant-kill-b"])
                .unwrap()
                .board(board.clone()),
        )
        .layer(RateLimitLayer::new().board(board.clone()))
        .service(mock.clone());
    let mut tasks = Vec::new();
    for i in 0..130 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post("https://api.anthropic.com/v1/messages")
                .header("anthropic-version", "2023-06-01")
                .body(RequestBody::from(format!(
                    r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":"task {i}"}}]}}"#
                )))
                .unwrap();
            let res = svc.ready().await?.call(req).await?;
            let status = res.status();
            res.into_body().collect().await?;
            Ok::<_, tower_claude::BoxError>(status)
        }));
    }
    // The waiters are waiting on Redis when it dies.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    server.stop();
    let mut ok = 0;
    for t in tasks {
        let status = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("no request hangs")
            .unwrap()
            .expect("no request fails");
        assert_eq!(status, http::StatusCode::OK);
        ok += 1;
    }
    assert_eq!(ok, 130);
    assert_eq!(mock.stats().accepted, 130, "each sent once");
    // The waiters met the outage and finished on the local share.
    assert!(board.redis_status().unwrap().outages >= 1);
}

/// Issue 12 in Redis: the answer to a request shows the server's count from when it admitted
/// that request, before another answer gave back what it reserved; that older `remaining`
/// must not take the refund away again (the script lowered the level to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_remaining_does_not_undo_a_refund_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = options("t12s:").response_timeout(Duration::from_secs(2));
    let a = QuotaBoard::builder()
        .limits(group(), Limits::new(60, 1_000_000, 8_000))
        .build_redis(&server.url(), patient)
        .await
        .unwrap();
    let take = |tokens: u64| {
        a.acquire(key(), group(), Cost::new(1, 0, tokens))
            .max_wait(Duration::from_millis(20))
    };
    let first = take(1_500).await.unwrap();
    let second = take(1_500).await.unwrap();
    // The server admitted both: 5 000 output tokens left when it answered the first.
    let stale = RateLimitSnapshot {
        requests: view(60, 58),
        input_tokens: view(1_000_000, 1_000_000),
        output_tokens: view(8_000, 5_000),
        ..Default::default()
    };
    // The second answer ends first and gives 1 440 back.
    second.settle(Cost::new(1, 0, 60));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Then the first answer's headers arrive.
    first.observe(&stale);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 6 440 and some refill are still there.
    take(6_400).await.unwrap().settle(Cost::new(1, 0, 60));
    first.settle(Cost::new(1, 0, 60));
}

/// Issue 12, sixth pass, in Redis: a slow answer's count is at least its age minus the send
/// grace (2 s) old, and the server refilled since; the raise in the script credits that
/// refill (before, the level stayed at the count: 3 000 plus what the reading took).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_raises_with_the_refill_after_the_send_grace_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = options("t12g:").response_timeout(Duration::from_secs(2));
    // 100 requests a second.
    let a = QuotaBoard::builder()
        .limits(group(), Limits::new(6_000, 1_000_000, 1_000_000))
        .build_redis(&server.url(), patient)
        .await
        .unwrap();
    let snap = |requests| RateLimitSnapshot {
        requests: view(6_000, requests),
        input_tokens: view(1_000_000, 1_000_000),
        output_tokens: view(1_000_000, 1_000_000),
        ..Default::default()
    };
    let requests = |b: &QuotaBoard| {
        b.headroom(&key(), &group())
            .unwrap()
            .requests
            .unwrap()
            .remaining
    };
    // Another client of the key used it all.
    a.observe(&key(), &group(), &snap(0));
    let r = a
        .acquire(key(), group(), Cost::new(1, 0, 0))
        .max_wait(Duration::from_secs(1))
        .await
        .unwrap();
    // It stopped: 3 s later the answer to ours shows 3 000 left when the server counted it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.observe(&snap(3_000));
    // Counted 1 s before the answer at the latest: 100 more. The local mirror may show the
    // headers' 3 000 before Redis's reply (with the credit) lands, so wait for the credit, but
    // no longer than 0.5 s: refill alone adds 50 by then, far from the 90 asserted (a loaded
    // machine once read the mirror's 3 000 between the two).
    let started = Instant::now();
    while requests(&a) < 3_090 && started.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let level = requests(&a);
    assert!(level >= 3_090, "level {level}");
    r.settle(Cost::new(1, 0, 0));
}

/// Issue 12, seventh pass, in Redis: the requests a learning node lets through blind behind
/// its slow probe (after the probe grace, 2 s, then in a ramp) are charged in Redis when the probe's answer
/// seeds it, held there until they settle, and their refunds reach Redis. Before, Redis was
/// seeded with the probe's count alone (9 000 output tokens left while 6 000 more were on
/// their way upstream), held nothing for them, and never saw what they gave back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_grants_behind_a_slow_probe_are_charged_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = options("t12b:").response_timeout(Duration::from_secs(2));
    let a = learning_board(&server.url(), patient).await;
    let probe = a
        .acquire(key(), group(), Cost::new(1, 0, 1_000))
        .await
        .unwrap();
    let started = Instant::now();
    let (b1, b2) = tokio::join!(
        a.acquire(key(), group(), Cost::new(1, 0, 3_000)),
        a.acquire(key(), group(), Cost::new(1, 0, 3_000)),
    );
    let (b1, b2) = (b1.unwrap(), b2.unwrap());
    // Blind in a ramp: one after the probe grace (2 s), the next one grace later.
    assert!(started.elapsed() >= Duration::from_millis(3_900));
    assert_eq!(b1.charged(), Cost::new(0, 0, 0), "let through blind");
    // The probe's answer: the server counted it, not the two blind ones yet.
    probe.observe(&RateLimitSnapshot {
        requests: view(100, 99),
        input_tokens: view(1_000_000, 1_000_000),
        output_tokens: view(10_000, 9_000),
        ..Default::default()
    });
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hash = format!("t12b:{{{}:{}}}", key(), group());
    let read = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let hash = hash.clone();
        async move {
            let v: Vec<Option<f64>> = redis::cmd("HMGET")
                .arg(&hash)
                .arg("l3")
                .arg("h3")
                .query_async(&mut conn)
                .await
                .unwrap();
            (v[0], v[1])
        }
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let (level, held) = loop {
        let (level, held) = read(&mut conn).await;
        if level.is_some() || Instant::now() > deadline {
            break (level, held);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Seeded at 9 000 minus the 6 000 of the two blind requests; the three held.
    let level = level.expect("Redis seeded");
    assert!((3_000.0..3_100.0).contains(&level), "output level {level}");
    assert_eq!(held, Some(7_000.0));
    // Their answers give back what they did not use, in Redis.
    probe.settle(Cost::new(1, 0, 60));
    b1.settle(Cost::new(1, 0, 60));
    b2.settle(Cost::new(1, 0, 60));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (level, held) = read(&mut conn).await;
        if held == Some(0.0) {
            let level = level.unwrap();
            // 3 000 + 940 + 2 × 2 940 (+ refill).
            assert!((9_820.0..9_950.0).contains(&level), "output level {level}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "units stay held in Redis: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one node of the fairness test is: a boxed service.
#[cfg(feature = "testing")]
type Node = tower::util::BoxCloneService<
    http::Request<tower_claude::body::RequestBody>,
    http::Response<
        http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, tower_claude::BoxError>,
    >,
    tower_claude::BoxError,
>;

/// One node of the fairness test: a learning Redis board, a key pool of one key and a rate
/// limiter in front of the shared simulator.
#[cfg(feature = "testing")]
async fn pooled_node(url: &str, prefix: &str, mock: &tower_claude::testing::MockClaude) -> Node {
    // Patient with Redis: a slow reply on a loaded machine is no outage here.
    let patient = options(prefix).response_timeout(Duration::from_secs(2));
    let board = learning_board(url, patient).await;
    node_with(board, &["sk-ant-fair-shared"], mock)
}

/// The simulator of the pooled-node tests: `rpm` requests a minute per key (tokens
/// unlimited), answers after `latency` with 5 output tokens.
#[cfg(feature = "testing")]
fn simulator(rpm: u64, latency: Duration) -> tower_claude::testing::MockClaude {
    tower_claude::testing::MockClaude::builder()
        .default_limits(tower_claude::testing::MockLimits::new(
            rpm,
            100_000_000,
            100_000_000,
        ))
        .latency(latency, Duration::ZERO)
        .output_tokens(5)
        .build()
}

/// A node: a key pool of `keys` and a rate limiter sharing `board`, in front of `mock`.
#[cfg(feature = "testing")]
fn node_with(board: QuotaBoard, keys: &[&str], mock: &tower_claude::testing::MockClaude) -> Node {
    node_on(board, keys, mock.clone())
}

/// [`node_with`] in front of any upstream (the mock behind a recorder, say).
#[cfg(feature = "testing")]
fn node_on<S>(board: QuotaBoard, keys: &[&str], upstream: S) -> Node
where
    S: tower::Service<
            http::Request<tower_claude::body::RequestBody>,
            Response = http::Response<tower_claude::testing::MockBody>,
            Error = tower_claude::BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt};
    use tower_claude::key_pool::KeyPoolLayer;
    use tower_claude::rate_limit::RateLimitLayer;
    let svc = ServiceBuilder::new()
        .layer(KeyPoolLayer::new(keys).unwrap().board(board.clone()))
        .layer(RateLimitLayer::new().board(board))
        .service(upstream)
        .map_response(|res| res.map(|b| b.map_err(Into::into).boxed_unsync()));
    tower::util::BoxCloneService::new(svc)
}

/// A small Messages request for `claude-haiku-4-5` (`max_tokens` 10).
#[cfg(feature = "testing")]
fn haiku_request(text: &str) -> http::Request<tower_claude::body::RequestBody> {
    http::Request::post("https://api.anthropic.com/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .body(tower_claude::body::RequestBody::from(format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":"{text}"}}]}}"#
        )))
        .unwrap()
}

/// Issue 12: two nodes with equal demand get equal shares from the very start, although one
/// of them learns the limits: its requests were held behind its probe and went all at once
/// when the limits reached Redis, while the other node's waited for the learning lock
/// outside the Redis line (before the fix: 36 / 26 and 23 / 39 of the first 62; after:
/// 31 / 31, 32 / 30). A node that joins later gets its turn within a few admissions, not
/// after the others' queues.
///
/// Counted in the order requests reach the upstream (each node's requests are recorded as
/// they are sent, right after their admission), not by wall-clock instants: the board's
/// turns are an order, and on a loaded machine the time between an admission and the
/// moment its worker records it is anything (the wall-clock version failed once in a loaded
/// run and one run in ten beside three busy loops on the two cores: the split at 2.5 s of
/// completions, not of admissions). The third node joins once the burst is spent (60
/// admissions and a few refills seen) and the run ends six admissions after it joined,
/// whatever the time.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_equal_demand_get_equal_shares_and_a_late_node_is_not_starved() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let Some(server) = RedisServer::start() else {
        return;
    };
    // One key, 60 requests a minute: a burst of 60, then one a second.
    let mock = simulator(60, Duration::from_millis(20));
    let url = server.url();
    // Which node sent each request upstream, in order.
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let fleet = |node: usize, svc: Node| {
        (0..12)
            .map(|w| {
                let (svc, mut stopped) = (svc.clone(), stopped.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !*stopped.borrow() {
                        i += 1;
                        let req = http::Request::post("https://api.anthropic.com/v1/messages")
                            .header("anthropic-version", "2023-06-01")
                            .body(tower_claude::body::RequestBody::from(format!(
                                r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":"node {node} worker {w} task {i}"}}]}}"#
                            )))
                            .unwrap();
                        // Still waiting at the end: dropped (takes nothing).
                        let res = tokio::select! {
                            res = svc.clone().oneshot(req) => res,
                            _ = stopped.wait_for(|s| *s) => return,
                        };
                        let res = res.expect("no request fails");
                        assert_eq!(res.status(), http::StatusCode::OK, "node {node}");
                        res.into_body().collect().await.unwrap();
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    let recorded = |node: usize, board: QuotaBoard| {
        let arrivals = arrivals.clone();
        let upstream = tower::ServiceBuilder::new()
            .map_request(move |req| {
                arrivals.lock().unwrap().push(node);
                req
            })
            .service(mock.clone());
        node_on(board, &["sk-ant-fair-shared"], upstream)
    };
    let patient = || options("t-fair:").response_timeout(Duration::from_secs(2));
    let count = || arrivals.lock().unwrap().len();
    let wait_for = |n: usize, what: &'static str| {
        let count = &count;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while count() < n {
                assert!(Instant::now() < deadline, "{what}: {} of {n}", count());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Two nodes start together, cold: one learns the limits, the other waits for it.
    let a = recorded(0, learning_board(&url, patient()).await);
    let b = recorded(1, learning_board(&url, patient()).await);
    let mut tasks = fleet(0, a);
    tasks.extend(fleet(1, b));
    // A third node joins once the burst is spent and the others queue.
    wait_for(63, "the burst and three refills").await;
    let c = recorded(2, learning_board(&url, patient()).await);
    let joined = count();
    tasks.extend(fleet(2, c));
    wait_for(joined + 6, "six admissions after the third node joined").await;
    stop.send(true).unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("every worker ends")
            .unwrap();
    }
    let log = arrivals.lock().unwrap().clone();
    let share = |node: usize, range: std::ops::Range<usize>| {
        log[range].iter().filter(|n| **n == node).count()
    };
    // The burst and the first refills, before the third node: equal shares.
    let (n0, n1) = (share(0, 0..joined), share(1, 0..joined));
    eprintln!(
        "before the third node: {n0} and {n1} ({:?}); after: {:?}",
        &log[..joined],
        &log[joined..]
    );
    assert!(n0 + n1 >= 60, "the burst was used: {n0} + {n1}");
    // The two lines alternate, but which head reaches Redis first when both arrive within a
    // moment is a race: fair runs measured 1 to 7 apart over these 63 admissions (1 to 3 in
    // nine printed runs, 29 / 34 in one run of four of the whole file on 2026-12-07, 35 / 28
    // once under load), the bug this guards 10 and 16 (36 / 26, 23 / 39). A bound of 4 failed
    // one run in four.
    assert!(
        n0.abs_diff(n1) <= 7,
        "equal demand, equal shares: {n0} and {n1} before the third node"
    );
    // The third node: its first admission within three (one refill a second: the others'
    // heads waiting when it joined, then its turn), and its share of what came after.
    let first = log[joined..]
        .iter()
        .position(|n| *n == 2)
        .expect("the late node is served");
    assert!(
        first < 3,
        "the late node's first admission came after {first} of the others'"
    );
    let after = |node: usize| share(node, joined..log.len());
    let (a0, a1, a2) = (after(0), after(1), after(2));
    assert!(
        a2 + 1 >= a0.min(a1),
        "the late node gets its turn: {a0}, {a1}, {a2} after it joined"
    );
    assert_eq!(
        mock.stats().rate_limited,
        0,
        "no request went over the limit"
    );
}

/// Issue 12: while a key's limits are being learned, the waiters of every node hold a place
/// in the key's Redis line — the learner's too (they waited behind its probe in-process and
/// found the line empty once the limits reached Redis, or, when only the other nodes
/// queued, let those take the first burst).
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_waits_in_line_while_limits_are_learned() {
    use tower::ServiceExt;

    let Some(server) = RedisServer::start() else {
        return;
    };
    // A slow upstream: the probe is out for a second.
    let mock = simulator(60, Duration::from_millis(1_000));
    let url = server.url();
    let send = |svc: Node, name: &'static str| {
        tokio::spawn(async move {
            let req = http::Request::post("https://api.anthropic.com/v1/messages")
                .header("anthropic-version", "2023-06-01")
                .body(tower_claude::body::RequestBody::from(format!(
                    r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":"{name}"}}]}}"#
                )))
                .unwrap();
            let res = svc.oneshot(req).await.expect("no request fails");
            assert_eq!(res.status(), http::StatusCode::OK);
        })
    };
    let a = pooled_node(&url, "t-learnline:", &mock).await;
    let b = pooled_node(&url, "t-learnline:", &mock).await;
    // Node A probes; its second request and node B's wait for the limits.
    let probe = send(a.clone(), "a-probe");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a2 = send(a, "a-second");
    let b1 = send(b, "b-first");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lines: Vec<String> = redis::cmd("KEYS")
        .arg("t-learnline:*:line")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lines.len(), 1, "one key, one group: {lines:?}");
    let waiting: u64 = redis::cmd("ZCARD")
        .arg(&lines[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(waiting, 2, "node A's waiter and node B's are in line");
    for t in [probe, a2, b1] {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("every request is served")
            .unwrap();
    }
    assert_eq!(mock.stats().rate_limited, 0);
}

/// Issue 12, Redis under load: a stalled Redis (every call times out, as on a loaded machine)
/// marks the board down. A grant taken in Redis before the stall and settled during it, and an
/// acquire whose reply timed out although Redis ran it, must both reach Redis when it is back:
/// before, the settle was skipped (its refund lost, its units `held` in Redis for good, which
/// blocks every later raise of the key) and the timed-out grant was never given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_redis_stall_reach_redis_when_it_is_back() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let board = QuotaBoard::builder()
        .limits(group(), Limits::new(100, 1_000_000, 10_000))
        .build_redis(&server.url(), options("t20:"))
        .await
        .unwrap();
    let first = board
        .acquire(key(), group(), Cost::new(1, 0, 8_000))
        .await
        .unwrap();
    assert_eq!(board.redis_status().unwrap().shared_grants, 1);

    // Redis stalls for 0.6 s (a blocking command on another connection).
    let url = server.url();
    let stall = tokio::spawn(async move {
        let mut conn = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.6")
            .query_async(&mut conn)
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // This acquire's reply times out (Redis runs the script after the stall): the board goes
    // to its local share.
    let during = board
        .acquire(key(), group(), Cost::new(1, 0, 1))
        .await
        .unwrap();
    assert!(board.redis_status().unwrap().degraded);
    // The first request's answer arrives while the board is marked down.
    first.settle(Cost::new(1, 0, 60));
    during.settle(Cost::new(1, 0, 1));
    stall.await.unwrap();

    let waited = Instant::now();
    while board.redis_status().unwrap().degraded {
        assert!(waited.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hash = format!("t20:{{{}:{}}}", key(), group());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(&hash)
            .arg("h1")
            .arg("h3")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Nothing is in flight: every unit taken in Redis left `held`.
        if held == [Some(0), Some(0)] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "units stay held in Redis: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refund reached Redis: 7 000 output tokens fit again at once (10 000 − 60 used).
    let r = board
        .acquire(key(), group(), Cost::new(1, 0, 7_000))
        .max_wait(Duration::from_millis(50))
        .await
        .expect("the refund of the settle held during the stall is in Redis");
    r.settle(Cost::new(1, 0, 60));
}

/// Issue 12, the learner's lead: two cold nodes with the same two keys. The node whose
/// requests reached Redis first took both keys' learning locks and sent both probes (one per
/// key), and with turns between the nodes afterwards its fleet kept that lead to the end.
/// Now a node that learns one key of a group leaves the free lock of another to the other
/// nodes for a moment: each node sends one probe.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_nodes_each_probe_one_key_instead_of_one_node_probing_every_key() {
    use tower::ServiceExt;

    let Some(server) = RedisServer::start() else {
        return;
    };
    // The probes answer after 500 ms; everything else goes after the limits are in Redis,
    // so it ends a full answer time later.
    let mock = simulator(60, Duration::from_millis(500));
    let url = server.url();
    let keys = ["sk-ant-probe-one", "sk-ant-probe-two"];
    let patient = || options("t-probes:").response_timeout(Duration::from_secs(2));
    let a = node_with(learning_board(&url, patient()).await, &keys, &mock);
    let b = node_with(learning_board(&url, patient()).await, &keys, &mock);
    let start = Instant::now();
    let done = Arc::new(std::sync::Mutex::new(Vec::<(&str, Duration)>::new()));
    let send = |svc: Node, node: &'static str, i: usize| {
        let done = done.clone();
        tokio::spawn(async move {
            let res = svc
                .oneshot(haiku_request(&format!("{node} {i}")))
                .await
                .expect("no request fails");
            assert_eq!(res.status(), http::StatusCode::OK);
            done.lock().unwrap().push((node, start.elapsed()));
        })
    };
    // Node A first: its requests reach both keys' locks before node B asks.
    let mut tasks: Vec<_> = (0..4).map(|i| send(a.clone(), "a", i)).collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    tasks.extend((0..4).map(|i| send(b.clone(), "b", i)));
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("every request is served")
            .unwrap();
    }
    let done = done.lock().unwrap().clone();
    let probes = |node: &str| {
        done.iter()
            .filter(|(n, at)| *n == node && *at < Duration::from_millis(850))
            .count()
    };
    assert_eq!(
        (probes("a"), probes("b")),
        (1, 1),
        "one probe per node, one per key (answers: {done:?})"
    );
    assert_eq!(mock.stats().rate_limited, 0);
}

/// Issue 12: a head of the key pool holds one ticket in the Redis line of every key it
/// tries, refreshed only by its calls on that key. A served head queues its successor's
/// ticket in the key that served it (the handoff); when that key then leaves the
/// successor's candidates (a 403 on this node, say), the ticket was never refreshed nor
/// left and blocked the key's line for every other node until it went stale (2 s). Now a
/// head leaves the line of every key it does not try.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_on_a_key_the_successor_no_longer_tries_does_not_block_its_line() {
    use tower::ServiceExt;
    use tower_claude::testing::Fault;

    let Some(server) = RedisServer::start() else {
        return;
    };
    let mock = simulator(120, Duration::from_millis(20));
    let url = server.url();
    let (raw1, raw2) = ("sk-ant-handoff-one", "sk-ant-handoff-two");
    let (k1, k2) = (KeyId::from_api_key(raw1), KeyId::from_api_key(raw2));
    // Key 1: 120 a minute (one every 0.5 s once spent); key 2: 6 a minute (one every 10 s).
    let board = || {
        QuotaBoard::builder()
            .limits(group(), Limits::new(120, 1_000_000, 1_000_000))
            .key_limits(k2.clone(), group(), Limits::new(6, 1_000_000, 1_000_000))
            .build_redis(
                &url,
                options("t-handoff:").response_timeout(Duration::from_secs(2)),
            )
    };
    let a = node_with(board().await.unwrap(), &[raw1, raw2], &mock);
    let other = board().await.unwrap();
    for (key, n) in [(&k1, 120), (&k2, 6)] {
        for _ in 0..n {
            other
                .acquire(key.clone(), group(), Cost::new(1, 1, 1))
                .await
                .expect("a full bucket")
                .keep();
        }
    }
    // Node A: two requests wait. The first is served on key 1 at its refill and queues the
    // second's ticket there; its answer is a 403, so node A no longer tries key 1.
    mock.push_fault(Fault::Status(403));
    let first = tokio::spawn(a.clone().oneshot(haiku_request("a first")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = tokio::spawn(a.clone().oneshot(haiku_request("a second")));
    let res = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the first request is served")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::FORBIDDEN);
    // Another node waits for key 1: it gets the next refill (0.5 s), not the refill after
    // the handed-off ticket went stale (2 s).
    let asked = Instant::now();
    let grant = tokio::time::timeout(
        Duration::from_secs(5),
        other.acquire(k1.clone(), group(), Cost::new(1, 1, 1)),
    )
    .await
    .expect("served")
    .expect("admitted");
    let waited = asked.elapsed();
    grant.keep();
    assert!(
        waited < Duration::from_millis(1_300),
        "the other node waited {waited:?} for key 1"
    );
    second.abort();
}

/// Issue 12, turns between nodes behind key pools: a busy node (four requests) and a node
/// with one request that arrives after the busy node's first. The busy node holds one ticket
/// at a time (its head's); when its head is served, the same script call queues its next
/// head's ticket, at that instant — behind the other node's waiter, which arrived before it.
/// So both nodes are served in arrival order of their heads: a1, b1, a2, a3, a4.
#[cfg(feature = "testing")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_head_queues_its_successor_and_pooled_nodes_are_served_in_arrival_order() {
    use tower::ServiceExt;

    let Some(server) = RedisServer::start() else {
        return;
    };
    // 60 a minute: one request a second once the bucket is empty. Answers take 300 ms.
    let mock = simulator(60, Duration::from_millis(300));
    let url = server.url();
    let raw = "sk-ant-turns-shared";
    let board = || {
        QuotaBoard::builder()
            .limits(group(), Limits::new(60, 1_000_000, 1_000_000))
            .build_redis(
                &url,
                options("t-turns:").response_timeout(Duration::from_secs(2)),
            )
    };
    let a = node_with(board().await.unwrap(), &[raw], &mock);
    let b = node_with(board().await.unwrap(), &[raw], &mock);
    // The burst, through the simulator too (its headers would raise the levels otherwise).
    let burst: Vec<_> = (0..60)
        .map(|i| tokio::spawn(b.clone().oneshot(haiku_request(&format!("burst {i}")))))
        .collect();
    for t in burst {
        let res = t.await.unwrap().expect("served");
        assert_eq!(res.status(), http::StatusCode::OK);
    }
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, svc) in [("a1", &a), ("a2", &a), ("b1", &b), ("a3", &a), ("a4", &a)] {
        let (svc, order) = (svc.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(haiku_request(name)).await.expect("served");
            assert_eq!(res.status(), http::StatusCode::OK);
            order.lock().unwrap().push(name);
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // When a1 is served (the bucket's `held` goes to 1), its successor's ticket is in the
    // line already, scored with the instant of the grant (the bucket's last update).
    let mut conn = redis::Client::open(url.clone())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let hashes: Vec<String> = redis::cmd("KEYS")
        .arg("t-turns:*}")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hashes.len(), 1, "one key, one group: {hashes:?}");
    let hash = &hashes[0];
    let (granted_at, line) = loop {
        let (held, t, line): (Option<u64>, Option<i64>, Vec<(String, i64)>) = redis::pipe()
            .atomic()
            .hget(hash, "h1")
            .hget(hash, "t")
            .zrange_withscores(format!("{hash}:line"), 0, -1)
            .query_async(&mut conn)
            .await
            .unwrap();
        if held == Some(1) {
            break (t.expect("updated by the grant"), line);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(line.len(), 2, "b1's ticket and a2's: {line:?}");
    assert!(
        line[1].1 == granted_at,
        "the successor was queued by the grant ({granted_at}), behind b1: {line:?}"
    );
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("every request is served")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3", "a4"]);
    assert_eq!(mock.stats().rate_limited, 0);
}

/// Issue 12, eighth pass: the probe's answer seeds Redis and holds the probe there (a blind
/// grant); its settle, sent when the answer's body ends, gives it back. Both calls are sent
/// from spawned tasks: when the settle ran first (a quick non-streaming answer, a busy
/// machine), it found nothing held, and the seed then held the probe in `h1..h3` for good.
/// Every raise subtracts what is held, so that key's Redis levels lagged the server for
/// the rest of the run (2 nodes / 2 keys over HTTP: 45–47 s in four runs of six, one key
/// ending with ~20 requests of its bucket unused). Now a settle waits for the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_settled_as_its_answer_seeds_redis_holds_nothing_there() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let patient = options("t12s:").response_timeout(Duration::from_secs(2));
    let a = learning_board(&server.url(), patient).await;
    let keys: Vec<KeyId> = (0..24).map(|i| KeyId::named(&format!("k{i}"))).collect();
    for k in &keys {
        let probe = a
            .acquire(k.clone(), group(), Cost::new(1, 100, 1_000))
            .await
            .unwrap();
        // The answer's headers, then at once the end of its body.
        probe.observe(&RateLimitSnapshot {
            requests: view(100, 99),
            input_tokens: view(1_000_000, 999_000),
            output_tokens: view(10_000, 9_000),
            ..Default::default()
        });
        probe.settle(Cost::new(1, 100, 60));
    }
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Nothing is in flight: once the calls are done, nothing is held on any key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stuck = Vec::new();
    for k in &keys {
        let held: Vec<Option<f64>> = redis::cmd("HMGET")
            .arg(format!("t12s:{{{k}:{}}}", group()))
            .arg("h1")
            .arg("h2")
            .arg("h3")
            .query_async(&mut conn)
            .await
            .unwrap();
        if held.iter().any(|h| h.is_some_and(|h| h != 0.0)) {
            stuck.push((k.to_string(), held));
        }
    }
    assert!(
        stuck.is_empty(),
        "units held with nothing in flight: {stuck:?}"
    );
}
