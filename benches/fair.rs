//! Admission cost of the weighted fair queue (issue 15) with one tenant and with 1,000
//! tenants, the same number of waiters: the bare `FairQueue` (push + pop), and a full
//! admission through the quota board (a waiter queues, a refund grants the head in fair
//! order, the granted future resolves).
//!
//! `cargo bench --bench fair -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tower_claude::anthropic::{KeyId, RateLimitGroup};
use tower_claude::quota::{Acquire, Cost, Limits, QuotaBoard, Reservation};
use tower_claude::tenant::Tenant;
use tower_claude::tenant::fair::FairQueue;

/// Waiters queued at all times.
const WAITERS: usize = 10_000;

fn tenants(n: usize) -> Vec<Tenant> {
    (0..n)
        .map(|i| Tenant::new(format!("tenant-{i}")).weight(1 + (i % 3) as u32))
        .collect()
}

fn bench_queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("fair_queue_push_pop");
    for n in [1usize, 1_000] {
        let ts = tenants(n);
        let mut q = FairQueue::new();
        let mut id = 0u64;
        for i in 0..WAITERS {
            id += 1;
            q.push(id, Some(&ts[i % n]), ());
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                id += 1;
                q.push(id, Some(&ts[id as usize % n]), ());
                black_box(q.pop())
            })
        });
    }
    g.finish();
}

/// Records which waiter a grant woke.
struct Flag {
    index: usize,
    woken: Arc<Mutex<Vec<usize>>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.woken.lock().unwrap().push(self.index);
    }
}

struct Waiting {
    acquire: Pin<Box<Acquire>>,
    waker: Waker,
}

fn bench_board(c: &mut Criterion) {
    let mut g = c.benchmark_group("board_admission_with_10k_waiters");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    for n in [1usize, 1_000] {
        let _guard = rt.enter();
        let ts = tenants(n);
        let group = RateLimitGroup::new("claude-sonnet-4");
        // One request a minute and a paused clock: nothing refills, every admission is a
        // refund handed to the head of the queue.
        let board = QuotaBoard::builder()
            .limits(group.clone(), Limits::new(1, u64::MAX / 4, u64::MAX / 4))
            .build();
        let key = KeyId::named("k");
        let cost = Cost::new(1, 10, 10);
        let woken = Arc::new(Mutex::new(Vec::new()));
        let mut waiting: HashMap<usize, Waiting> = HashMap::new();
        let mut next = 0usize;
        let enqueue = |waiting: &mut HashMap<usize, Waiting>, next: &mut usize| {
            let index = *next;
            *next += 1;
            let waker = Waker::from(Arc::new(Flag {
                index,
                woken: woken.clone(),
            }));
            let mut acquire = Box::pin(
                board
                    .acquire(key.clone(), group.clone(), cost)
                    .tenant(ts[index % n].clone()),
            );
            assert!(
                acquire
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
            waiting.insert(index, Waiting { acquire, waker });
        };
        let mut held: Option<Reservation> = Some(board.try_acquire(&key, &group, cost).unwrap());
        for _ in 0..WAITERS {
            enqueue(&mut waiting, &mut next);
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                enqueue(&mut waiting, &mut next);
                // The quota comes back: the board grants the head of its fair queue.
                if let Some(r) = held.take() {
                    r.refund();
                }
                let indices: Vec<usize> = std::mem::take(&mut *woken.lock().unwrap());
                for index in indices {
                    let Some(w) = waiting.get_mut(&index) else {
                        continue;
                    };
                    let waker = w.waker.clone();
                    if let Poll::Ready(r) =
                        w.acquire.as_mut().poll(&mut Context::from_waker(&waker))
                    {
                        held = Some(r.unwrap());
                        waiting.remove(&index);
                    }
                }
                assert!(held.is_some());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_queue, bench_board);
criterion_main!(benches);
