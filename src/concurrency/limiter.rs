//! The shared, resizable cap behind [`ConcurrencyLayer`](super::ConcurrencyLayer).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Additive-increase / multiplicative-decrease settings for an adaptive cap.
///
/// The cap shrinks (`cap * decrease`, at least `min`) when a response is 429 or 529, at most
/// once per `cooldown`, and grows by one after `cap` consecutive successes, up to `max`.
///
/// ```
/// use tower_claude::concurrency::Aimd;
///
/// let aimd = Aimd { initial: 8, min: 1, max: 64, ..Aimd::default() };
/// assert_eq!(aimd.decrease, 0.5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// The cap at start.
    pub initial: usize,
    /// The floor.
    pub min: usize,
    /// The ceiling.
    pub max: usize,
    /// Multiplier applied on a 429 / 529 (clamped to `0.0..=1.0`).
    pub decrease: f64,
    /// Minimum time between two decreases (one burst of refusals shrinks the cap once).
    pub cooldown: Duration,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            initial: 8,
            min: 1,
            max: 64,
            decrease: 0.5,
            cooldown: Duration::from_secs(1),
        }
    }
}

/// Limits how fast the cap may grow: it starts at `initial` and rises by at most `step` per
/// `interval` (Anthropic applies acceleration limits to sharp increases in traffic). After an
/// adaptive decrease the ramp restarts from the decreased cap.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::concurrency::RampUp;
///
/// let ramp = RampUp { initial: 2, step: 1, interval: Duration::from_secs(10) };
/// assert_eq!(ramp.cap_after(2, Duration::from_secs(35)), 5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RampUp {
    /// The cap at start.
    pub initial: usize,
    /// Growth per interval.
    pub step: usize,
    /// The interval.
    pub interval: Duration,
}

impl RampUp {
    /// The cap allowed `elapsed` after the ramp started from `base`.
    pub fn cap_after(&self, base: usize, elapsed: Duration) -> usize {
        let steps = if self.interval.is_zero() {
            u64::MAX
        } else {
            (elapsed.as_nanos() / self.interval.as_nanos()).min(u64::MAX as u128) as u64
        };
        let add = (self.step as u64).saturating_mul(steps);
        base.saturating_add(usize::try_from(add).unwrap_or(usize::MAX))
    }

    fn next_step(&self, since: Instant, now: Instant) -> Option<Instant> {
        if self.interval.is_zero() || self.step == 0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(since);
        let n = elapsed.as_nanos() / self.interval.as_nanos() + 1;
        let nanos = u64::try_from(self.interval.as_nanos().saturating_mul(n)).ok()?;
        since.checked_add(Duration::from_nanos(nanos))
    }
}

#[derive(Debug)]
struct State {
    /// The cap the semaphore currently enforces.
    target: usize,
    /// The cap the adaptive logic wants (before the ramp).
    desired: usize,
    /// Permits still held by requests that must be forgotten instead of returned.
    debt: usize,
    successes: usize,
    last_decrease: Option<Instant>,
    ramp_base: usize,
    ramp_since: Instant,
}

#[derive(Debug)]
pub(crate) struct Limiter {
    sem: Arc<Semaphore>,
    state: Mutex<State>,
    aimd: Option<Aimd>,
    ramp: Option<RampUp>,
    max: usize,
}

impl Limiter {
    pub(crate) fn new(max: usize, aimd: Option<Aimd>, ramp: Option<RampUp>) -> Arc<Self> {
        let now = Instant::now();
        let (desired, max) = match aimd {
            Some(a) => {
                let max = a.max.max(a.min).max(1);
                (a.initial.clamp(a.min.max(1), max), max)
            }
            None => (max.max(1), max.max(1)),
        };
        let ramp_base = ramp.map_or(desired, |r| r.initial.clamp(1, desired));
        let target = ramp_base;
        Arc::new(Self {
            sem: Arc::new(Semaphore::new(target)),
            state: Mutex::new(State {
                target,
                desired,
                debt: 0,
                successes: 0,
                last_decrease: None,
                ramp_base,
                ramp_since: now,
            }),
            aimd,
            ramp,
            max,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resize(&self, st: &mut State, new: usize) {
        let new = new.clamp(1, self.max);
        if new != st.target {
            tracing::debug!(
                from = st.target,
                to = new,
                mode = if self.aimd.is_some() {
                    "adaptive"
                } else {
                    "ramp-up"
                },
                "concurrency: cap changed"
            );
        }
        if new < st.target {
            let diff = st.target - new;
            let forgotten = self.sem.forget_permits(diff);
            st.debt += diff - forgotten;
        } else if new > st.target {
            let diff = new - st.target;
            let pay = diff.min(st.debt);
            st.debt -= pay;
            self.sem.add_permits(diff - pay);
        }
        st.target = new;
    }

    /// Applies the ramp at `now`; returns when the next ramp step is due (if the ramp still
    /// limits the cap).
    pub(crate) fn refresh(&self, now: Instant) -> Option<Instant> {
        if !self.moves() {
            // A fixed cap: nothing to apply (no lock taken).
            return None;
        }
        let mut st = self.lock();
        self.refresh_locked(&mut st, now)
    }

    fn refresh_locked(&self, st: &mut State, now: Instant) -> Option<Instant> {
        let (cap, next) = match self.ramp {
            Some(r) => {
                let cap = r.cap_after(st.ramp_base, now.saturating_duration_since(st.ramp_since));
                let next = (cap < st.desired)
                    .then(|| r.next_step(st.ramp_since, now))
                    .flatten();
                (cap.min(st.desired), next)
            }
            None => (st.desired, None),
        };
        if cap != st.target {
            self.resize(st, cap);
        }
        next
    }

    /// Whether the cap can move (adaptive or ramped up): a fixed cap's target is its
    /// `desired` from the start and never changes, so it needs no refresh and no clock.
    pub(crate) fn moves(&self) -> bool {
        self.aimd.is_some() || self.ramp.is_some()
    }

    /// Whether the cap adapts to feedback.
    pub(crate) fn is_adaptive(&self) -> bool {
        self.aimd.is_some()
    }

    /// Feedback from a stream that failed with `event: error` after its 200 head (an
    /// overloaded server mid-stream): shrinks the cap as a 529 would (adaptive mode only).
    pub(crate) fn on_stream_error(&self, now: Instant) {
        let Some(aimd) = self.aimd else { return };
        let mut st = self.lock();
        self.decrease(&aimd, &mut st, now);
    }

    /// Feedback from a response status (adaptive mode only).
    pub(crate) fn on_status(&self, status: http::StatusCode, now: Instant) {
        let Some(aimd) = self.aimd else { return };
        let mut st = self.lock();
        let code = status.as_u16();
        if code == 429 || code == 529 {
            self.decrease(&aimd, &mut st, now);
        } else if status.is_success() {
            st.successes += 1;
            if st.successes >= st.desired {
                st.successes = 0;
                st.desired = (st.desired + 1).min(self.max);
                self.refresh_locked(&mut st, now);
            }
        }
    }

    /// Multiplicative decrease, at most once per `aimd.cooldown`.
    fn decrease(&self, aimd: &Aimd, st: &mut State, now: Instant) {
        st.successes = 0;
        if st
            .last_decrease
            .is_some_and(|t| now.saturating_duration_since(t) < aimd.cooldown)
        {
            return;
        }
        let factor = if aimd.decrease.is_finite() {
            aimd.decrease.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let cur = st.target.min(st.desired);
        let next = ((cur as f64 * factor).floor() as usize).max(aimd.min.max(1));
        st.desired = next;
        st.last_decrease = Some(now);
        st.ramp_base = next;
        st.ramp_since = now;
        self.refresh_locked(st, now);
    }

    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.sem.clone().try_acquire_owned().ok().map(|p| Permit {
            permit: Some(p),
            limiter: self.clone(),
        })
    }

    /// Waits for a permit, re-applying the ramp at each of its steps.
    pub(crate) async fn acquire(self: Arc<Self>) -> Option<Permit> {
        use futures_util::future::{Either, select};
        loop {
            let next = self.refresh(Instant::now());
            let acquire = std::pin::pin!(self.sem.clone().acquire_owned());
            let permit = match next {
                None => acquire.await.ok()?,
                Some(at) => {
                    let sleep = std::pin::pin!(tokio::time::sleep_until(at));
                    match select(acquire, sleep).await {
                        Either::Left((p, _)) => p.ok()?,
                        Either::Right(_) => continue,
                    }
                }
            };
            return Some(Permit {
                permit: Some(permit),
                limiter: self,
            });
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.lock().target
    }

    pub(crate) fn in_flight(&self) -> usize {
        let st = self.lock();
        (st.target + st.debt).saturating_sub(self.sem.available_permits())
    }
}

/// A concurrency permit; returned to the cap (or forgotten while the cap shrinks) on drop.
pub(crate) struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish()
    }
}

impl Permit {
    pub(crate) fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            let mut st = self.limiter.lock();
            if st.debt > 0 {
                st.debt -= 1;
                p.forget();
            } else {
                drop(p);
            }
        }
    }
}

/// A read-only view of a [`ConcurrencyLayer`](super::ConcurrencyLayer)'s shared cap, for
/// metrics and status pages.
#[derive(Debug, Clone)]
pub struct ConcurrencyHandle {
    pub(crate) limiter: Arc<Limiter>,
}

impl ConcurrencyHandle {
    /// The current cap.
    pub fn limit(&self) -> usize {
        self.limiter.limit()
    }

    /// Requests holding a permit now (their response body not finished yet).
    pub fn in_flight(&self) -> usize {
        self.limiter.in_flight()
    }
}
