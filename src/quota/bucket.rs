//! Continuous-refill token bucket maths.
//!
//! Hand-written rather than taken from `governor`: its waits ignore tokio's paused clock, it
//! cannot refund a reservation, and it cannot be re-seeded from the server's view. This bucket
//! is plain arithmetic over [`tokio::time::Instant`] values passed in by the caller, so it is
//! deterministic in tests and trivially shared behind a lock.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket that refills continuously: `capacity` units per `period` (a per-minute limit
/// of `L` refills `L / 60` units a second), never above `capacity`.
///
/// The level may go below zero when a settled cost exceeds its reservation (debt): later
/// takers then wait until the debt is repaid by refill. The debt is bounded: the level never
/// falls below `-capacity`, so whatever usage is settled (a broken upstream reporting
/// `u64::MAX` tokens), the debt is repaid within one refill period and a request that fits
/// the capacity waits at most two.
///
/// ```
/// use std::time::Duration;
/// use tokio::time::Instant;
/// use tower_claude::quota::TokenBucket;
///
/// let start = Instant::now();
/// let mut bucket = TokenBucket::per_minute(60, start); // 1 unit per second, starts full
/// assert!(bucket.try_take(60, start).is_ok());
/// // Empty now: 5 units are back in 5 seconds.
/// assert_eq!(bucket.time_until(5, start), Some(Duration::from_secs(5)));
/// assert!(bucket.try_take(5, start + Duration::from_secs(5)).is_ok());
/// // More than the capacity can never be taken.
/// assert_eq!(bucket.time_until(61, start), None);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    /// Units per second.
    rate: f64,
    /// Refill period in seconds (capacity / rate).
    period: f64,
    level: f64,
    updated: Instant,
}

/// Why a take failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeError {
    /// Not enough units now; they will be there after this long.
    Wait(Duration),
    /// The request is larger than the bucket's capacity: it can never be admitted.
    ExceedsCapacity,
}

impl TokenBucket {
    /// A full bucket of `capacity` units refilled over `period`.
    ///
    /// A zero `period` is treated as one nanosecond.
    pub fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        let period = period.as_secs_f64().max(1e-9);
        Self {
            capacity: capacity as f64,
            rate: capacity as f64 / period,
            period,
            level: capacity as f64,
            updated: now,
        }
    }

    /// A full bucket for a per-minute limit.
    pub fn per_minute(limit: u64, now: Instant) -> Self {
        Self::new(limit, Duration::from_secs(60), now)
    }

    fn refill(&mut self, now: Instant) {
        if now > self.updated {
            let elapsed = now.duration_since(self.updated).as_secs_f64();
            self.level = (self.level + elapsed * self.rate).min(self.capacity);
            self.updated = now;
        }
    }

    /// The capacity (the per-period limit).
    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Units added per second.
    pub fn rate_per_sec(&self) -> f64 {
        self.rate
    }

    /// Units available at `now` (negative while in debt).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// The available fraction of capacity at `now`, in `0.0..=1.0`.
    pub fn fraction(&mut self, now: Instant) -> f64 {
        if self.capacity <= 0.0 {
            return 0.0;
        }
        (self.level(now) / self.capacity).clamp(0.0, 1.0)
    }

    /// How long until `n` units are available; `Some(ZERO)` when they are now, `None` when `n`
    /// exceeds the capacity.
    pub fn time_until(&self, n: u64, now: Instant) -> Option<Duration> {
        let n = n as f64;
        if n > self.capacity {
            return None;
        }
        let mut probe = self.clone();
        probe.refill(now);
        let missing = n - probe.level;
        if missing <= 0.0 {
            return Some(Duration::ZERO);
        }
        if probe.rate <= 0.0 {
            return None;
        }
        // Round up to the next nanosecond so that waking at `now + d` always suffices.
        let secs = missing / probe.rate;
        Some(Duration::from_nanos((secs * 1e9).ceil() as u64))
    }

    /// Takes `n` units if they are available now.
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), TakeError> {
        match self.time_until(n, now) {
            None => Err(TakeError::ExceedsCapacity),
            Some(Duration::ZERO) => {
                self.refill(now);
                self.level -= n as f64;
                Ok(())
            }
            Some(wait) => Err(TakeError::Wait(wait)),
        }
    }

    /// Takes `n` units unconditionally; the level may go negative (debt), down to
    /// `-capacity` at most.
    pub fn force_take(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level - n as f64).max(-self.capacity);
    }

    /// Gives `n` units back (a refund of an unused reservation), never above capacity.
    pub fn refund(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level + n as f64).min(self.capacity);
    }

    /// Settles a reservation of `reserved` units whose real cost was `actual`: refunds the
    /// difference, or takes the extra (possibly into debt).
    pub fn settle(&mut self, reserved: u64, actual: u64, now: Instant) {
        if actual < reserved {
            self.refund(reserved - actual, now);
        } else if actual > reserved {
            self.force_take(actual - reserved, now);
        }
    }

    /// Refills up to `ceiling` at most: what the refill would add above it is lost, as it is
    /// lost by a bucket that is full (a level already above `ceiling` stays where it is).
    /// A board uses it for a bucket whose server-side twin may hold less room than the
    /// capacity (requests taken here that the server has not seen yet).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokio::time::Instant;
    /// use tower_claude::quota::TokenBucket;
    ///
    /// let start = Instant::now();
    /// let mut bucket = TokenBucket::per_minute(60, start);
    /// bucket.force_take(10, start); // 50 left
    /// bucket.refill_below(55.0, start + Duration::from_secs(30));
    /// assert_eq!(bucket.level(start + Duration::from_secs(30)), 55.0);
    /// ```
    pub fn refill_below(&mut self, ceiling: f64, now: Instant) {
        let before = self.level;
        self.refill(now);
        if self.level > ceiling {
            self.level = before.max(ceiling).min(self.level);
        }
    }

    /// Gives `n` units back like [`TokenBucket::refund`], but not above `ceiling` (a level
    /// already above it stays where it is).
    ///
    /// ```
    /// use tokio::time::Instant;
    /// use tower_claude::quota::TokenBucket;
    ///
    /// let now = Instant::now();
    /// let mut bucket = TokenBucket::per_minute(60, now);
    /// bucket.force_take(30, now);
    /// bucket.refund_below(20, 40.0, now);
    /// assert_eq!(bucket.level(now), 40.0);
    /// ```
    pub fn refund_below(&mut self, n: u64, ceiling: f64, now: Instant) {
        self.refill(now);
        let before = self.level;
        self.level = (self.level + n as f64).min(self.capacity);
        if self.level > ceiling {
            self.level = before.max(ceiling).min(self.level);
        }
    }

    /// Re-seeds the level from an outside view (e.g. the server's `remaining`), never above
    /// capacity. Use [`TokenBucket::lower_to`] to only ever tighten.
    pub fn set_level(&mut self, level: u64, now: Instant) {
        self.refill(now);
        self.level = (level as f64).min(self.capacity);
    }

    /// Lowers the level to `level` if it is currently higher (the server knows of usage we did
    /// not see, e.g. other clients of the same organisation).
    pub fn lower_to(&mut self, level: u64, now: Instant) {
        self.refill(now);
        let level = (level as f64).min(self.capacity);
        if level < self.level {
            self.level = level;
        }
    }

    /// Changes the capacity (per-period limit), keeping the same period and the level clamped
    /// to the new capacity.
    pub fn set_capacity(&mut self, capacity: u64, now: Instant) {
        self.refill(now);
        self.capacity = capacity as f64;
        self.rate = self.capacity / self.period;
        self.level = self.level.clamp(-self.capacity, self.capacity);
    }

    /// Whether the bucket is full at `now` (an idle bucket carries no state worth keeping).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.level(now) >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_continuously_and_caps_at_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(600, t0);
        b.try_take(600, t0).unwrap();
        assert_eq!(b.level(t0 + Duration::from_secs(1)), 10.0);
        assert_eq!(b.level(t0 + Duration::from_secs(3600)), 600.0);
    }

    #[test]
    fn wait_time_is_exact() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(60, t0);
        b.try_take(60, t0).unwrap();
        assert_eq!(
            b.try_take(3, t0),
            Err(TakeError::Wait(Duration::from_secs(3)))
        );
        assert_eq!(b.try_take(61, t0), Err(TakeError::ExceedsCapacity));
        assert!(b.try_take(3, t0 + Duration::from_secs(3)).is_ok());
    }

    #[test]
    fn settle_refunds_and_charges_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(100, t0);
        b.try_take(100, t0).unwrap();
        b.settle(100, 40, t0);
        assert_eq!(b.level(t0), 60.0);
        b.settle(0, 80, t0);
        assert_eq!(b.level(t0), -20.0);
        assert_eq!(b.time_until(10, t0), Some(Duration::from_secs(18)));
    }

    #[test]
    fn reseed_and_capacity_change() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(1000, t0);
        b.lower_to(2000, t0);
        assert_eq!(b.level(t0), 1000.0);
        b.lower_to(300, t0);
        assert_eq!(b.level(t0), 300.0);
        b.set_capacity(120, t0);
        assert_eq!(b.level(t0), 120.0);
        assert_eq!(b.rate_per_sec(), 2.0);
        b.set_level(10, t0);
        assert!(!b.is_full(t0));
        assert!(b.is_full(t0 + Duration::from_secs(55)));
    }
}
