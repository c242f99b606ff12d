//! The shared, resizable cap behind [`ConcurrencyLayer`](super::ConcurrencyLayer).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;
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

    /// A permit now, if one is free.
    ///
    /// The semaphore's permit is taken by reference and forgotten: the [`Permit`] gives it
    /// back through its limiter (which owns the semaphore), so a permit holds one reference
    /// count (the limiter's), not two (an owned semaphore permit's own `Arc` beside it).
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let permit = self.sem.try_acquire().ok()?;
        permit.forget();
        Some(Permit {
            held: true,
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
            // Given back by the `Permit` (see `try_acquire`).
            permit.forget();
            return Some(Permit {
                held: true,
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
    /// One permit of the limiter's semaphore is held (taken and forgotten at acquisition,
    /// added back on drop).
    held: bool,
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
        if !std::mem::take(&mut self.held) {
            return;
        }
        let limiter = &self.limiter;
        // A fixed cap never shrinks, so it never owes permits (`debt` changes only in
        // `resize`, reached only from a cap that moves): no lock to look.
        if limiter.moves() {
            let mut st = limiter.lock();
            if st.debt > 0 {
                st.debt -= 1;
                return;
            }
        }
        limiter.sem.add_permits(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed cap's permits go back to its semaphore as they drop, whoever holds them.
    #[tokio::test]
    async fn a_fixed_cap_gets_every_permit_back() {
        let limiter = Limiter::new(2, None, None);
        let a = limiter.try_acquire().unwrap();
        let b = limiter.clone().acquire().await.unwrap();
        assert!(limiter.try_acquire().is_none());
        assert_eq!(limiter.in_flight(), 2);
        drop(a);
        assert_eq!(limiter.in_flight(), 1);
        let c = limiter.try_acquire().unwrap();
        drop(b);
        drop(c);
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.sem.available_permits(), 2);
    }

    /// A cap shrunk below what is in flight owes permits: the first ones dropped are
    /// forgotten, the rest go back, and the cap ends at its new size.
    #[tokio::test(start_paused = true)]
    async fn a_shrunk_cap_forgets_the_permits_it_owes() {
        let aimd = Aimd {
            initial: 4,
            min: 1,
            max: 4,
            decrease: 0.5,
            cooldown: Duration::from_secs(1),
        };
        let limiter = Limiter::new(4, Some(aimd), None);
        let permits: Vec<_> = (0..4).map(|_| limiter.try_acquire().unwrap()).collect();
        limiter.on_status(http::StatusCode::TOO_MANY_REQUESTS, Instant::now());
        assert_eq!(limiter.limit(), 2);
        let mut permits = permits.into_iter();
        drop(permits.next());
        drop(permits.next());
        assert_eq!(limiter.sem.available_permits(), 0, "owed: forgotten");
        drop(permits.next());
        assert_eq!(limiter.sem.available_permits(), 1);
        drop(permits.next());
        assert_eq!(limiter.sem.available_permits(), 2);
        assert_eq!(limiter.in_flight(), 0);
    }
}
