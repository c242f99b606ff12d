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
    /// Units, at most [`MAX_CAPACITY`].
    capacity: u64,
    /// Refill period in nanoseconds, in `1..=MAX_PERIOD_NS`.
    period: u64,
    /// `capacity × period`: the full level, scaled.
    full: i128,
    /// The level in `1 / period` units (units × period in nanoseconds): a nanosecond refills
    /// exactly `capacity` of these, so refill, takes and waits are exact integer arithmetic
    /// (issue 12, ninth pass: with `f64`, a level refilled in steps could differ from the same
    /// level refilled at once, and a board and a server that agree exactly could disagree on
    /// whether one unit is there — a float tie, 0.9999999999999984 against 1).
    level: i128,
    updated: Instant,
}

/// The largest capacity a bucket keeps (larger ones are clamped): 2^62 units, with a period
/// of [`MAX_PERIOD_NS`] at most, keeps every scaled level within an `i128`.
const MAX_CAPACITY: u64 = 1 << 62;
/// The longest refill period, in nanoseconds (longer ones are clamped): about 73 years.
const MAX_PERIOD_NS: u64 = 1 << 61;

/// `x` as a float without the software conversion of a 128-bit integer (~45 instructions):
/// exact below 2^53, rounded (twice at most) above.
fn as_f64(x: i128) -> f64 {
    match i64::try_from(x) {
        Ok(x) => x as f64,
        Err(_) => ((x >> 64) as i64) as f64 * 18_446_744_073_709_551_616.0 + (x as u64) as f64,
    }
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
    /// A zero `period` is treated as one nanosecond. The arithmetic is exact (integers of
    /// `1 / period` units), so a level refilled in steps equals the level refilled at once.
    pub fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let period = period.as_nanos().clamp(1, MAX_PERIOD_NS as u128) as u64;
        let full = capacity as i128 * period as i128;
        Self {
            capacity,
            period,
            full,
            level: full,
            updated: now,
        }
    }

    /// A full bucket for a per-minute limit.
    pub fn per_minute(limit: u64, now: Instant) -> Self {
        Self::new(limit, Duration::from_secs(60), now)
    }

    /// `n` units in the scaled representation.
    #[inline]
    fn scaled(&self, n: u64) -> i128 {
        (n.min(MAX_CAPACITY * 2) as i128) * self.period as i128
    }

    #[inline]
    fn full(&self) -> i128 {
        self.full
    }

    /// The scaled units `elapsed` refills (past two periods every level, never below
    /// `-capacity`, is full again).
    #[inline]
    fn added(&self, elapsed: Duration) -> i128 {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.added_nanos(nanos)
    }

    /// [`added`](Self::added) for `nanos` nanoseconds: one 64 × 64-bit multiplication.
    #[inline]
    fn added_nanos(&self, nanos: u64) -> i128 {
        (nanos.min(2 * self.period) as u128 * self.capacity as u128) as i128
    }

    #[inline]
    fn refill(&mut self, now: Instant) {
        if now > self.updated {
            let added = self.added(now.duration_since(self.updated));
            self.level = (self.level + added).min(self.full);
            self.updated = now;
        }
    }

    /// Refills to `now`, not above `capacity - held` (see [`refill_below`](Self::refill_below)),
    /// when the bucket was last refilled at `from`, `nanos` nanoseconds before `now`: the
    /// buckets of one `(key, group)` are refilled together, so the elapsed time is computed
    /// once for the three. A bucket refilled at another instant computes its own.
    #[inline]
    pub(crate) fn refill_after(&mut self, from: Instant, nanos: u64, held: u64, now: Instant) {
        if self.updated != from {
            return self.refill_below_held(held, now);
        }
        if nanos == 0 {
            return;
        }
        let before = self.level;
        self.level = (self.level + self.added_nanos(nanos)).min(self.full);
        self.updated = now;
        if held > 0 {
            let ceiling = self.full - self.scaled(held);
            if self.level > ceiling {
                self.level = before.max(ceiling).min(self.level);
            }
        }
    }

    /// When the bucket was last refilled.
    #[inline]
    pub(crate) fn updated(&self) -> Instant {
        self.updated
    }

    /// The capacity (the per-period limit).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Units added per second.
    pub fn rate_per_sec(&self) -> f64 {
        self.capacity as f64 * 1e9 / self.period as f64
    }

    /// Units available at `now` (negative while in debt).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        as_f64(self.level) / self.period as f64
    }

    /// Whether the level at `now` is above `n` units (exactly: no float rounding).
    pub(crate) fn above(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.level > self.scaled(n)
    }

    /// Whether the level at `now` is below `n` units (exactly).
    pub(crate) fn below(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.level < self.scaled(n)
    }

    /// The whole units an empty bucket refills in `elapsed` (rounded down, exactly; at most
    /// two capacities).
    pub(crate) fn refill_in(&self, elapsed: Duration) -> u64 {
        let added = self.added(elapsed);
        // A 64-bit division when the scaled units fit (always within the send grace, where
        // `added` is 0): the 128-bit one is a call of ~60 instructions (`__divti3`). Same
        // quotient: `added` is never negative.
        match u64::try_from(added) {
            Ok(added) => added / self.period,
            Err(_) => (added / i128::from(self.period)) as u64,
        }
    }

    /// The available fraction of capacity at `now` and the seconds until the bucket is full
    /// again by refill, without changing the bucket (a view: no clone, one refill).
    pub(crate) fn room(&self, now: Instant) -> (f64, f64) {
        if self.capacity == 0 {
            return (0.0, 0.0);
        }
        let mut level = self.level;
        if now > self.updated {
            level = (level + self.added(now.duration_since(self.updated))).min(self.full);
        }
        let fraction = (as_f64(level) / as_f64(self.full)).clamp(0.0, 1.0);
        // Missing scaled units refill at `capacity` a nanosecond.
        let missing = (self.full - level).max(0);
        let secs = as_f64(missing) / (self.capacity as f64 * 1e9);
        (fraction, secs)
    }

    /// The available fraction of capacity at `now`, in `0.0..=1.0`.
    pub fn fraction(&mut self, now: Instant) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        self.refill(now);
        (as_f64(self.level) / as_f64(self.full)).clamp(0.0, 1.0)
    }

    /// How long until `n` units are available; `Some(ZERO)` when they are now, `None` when `n`
    /// exceeds the capacity.
    pub fn time_until(&self, n: u64, now: Instant) -> Option<Duration> {
        if n > self.capacity {
            return None;
        }
        // Refilled at `now` already and holding `n` (a board checks the buckets it has just
        // refilled): the answer without the refill's and the wait's arithmetic, which stay out
        // of line (a board's check runs this for each of an entry's buckets, in line).
        if now <= self.updated && self.scaled(n) <= self.level {
            return Some(Duration::ZERO);
        }
        self.time_until_refilled(n, now)
    }

    /// [`time_until`](Self::time_until) past its first answers: the level refilled to `now`.
    #[inline(never)]
    fn time_until_refilled(&self, n: u64, now: Instant) -> Option<Duration> {
        let mut level = self.level;
        if now > self.updated {
            level = (level + self.added(now.duration_since(self.updated))).min(self.full);
        }
        let missing = self.scaled(n) - level;
        if missing <= 0 {
            return Some(Duration::ZERO);
        }
        if self.capacity == 0 {
            return None;
        }
        // Round up to the next nanosecond so that waking at `now + d` always suffices (and,
        // the arithmetic being exact, a nanosecond earlier does not).
        let nanos = (missing as u128).div_ceil(self.capacity as u128);
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// Takes `n` units if they are available now.
    pub fn try_take(&mut self, n: u64, now: Instant) -> Result<(), TakeError> {
        match self.time_until(n, now) {
            None => Err(TakeError::ExceedsCapacity),
            Some(Duration::ZERO) => {
                self.refill(now);
                self.level -= self.scaled(n);
                Ok(())
            }
            Some(wait) => Err(TakeError::Wait(wait)),
        }
    }

    /// Whether the level as last refilled holds `n` units (no refill: the level at `now` is
    /// at least that).
    #[inline]
    pub(crate) fn holds(&self, n: u64) -> bool {
        n <= self.capacity && self.level >= self.scaled(n)
    }

    /// Takes `n` units from the level as last refilled, leaving the time since to the next
    /// refill (for a level that [`holds`](Self::holds) them: see
    /// `Entry::take_unrefilled`, which lowers the refill's ceiling by as much).
    #[inline]
    pub(crate) fn take_as_is(&mut self, n: u64) {
        self.level = (self.level - self.scaled(n)).max(-self.full());
    }

    /// Takes `n` units unconditionally; the level may go negative (debt), down to
    /// `-capacity` at most.
    #[inline]
    pub fn force_take(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level - self.scaled(n)).max(-self.full());
    }

    /// Gives `n` units back (a refund of an unused reservation), never above capacity.
    #[inline]
    pub fn refund(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level + self.scaled(n)).min(self.full());
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

    /// `ceiling` units in the scaled representation (rounded down: a fractional ceiling
    /// keeps the bucket below it).
    fn scaled_ceiling(&self, ceiling: f64) -> i128 {
        let scaled = (ceiling * self.period as f64).floor();
        // `as` saturates (and maps NaN to 0).
        scaled as i128
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
        let ceiling = self.scaled_ceiling(ceiling);
        self.refill_under(ceiling, now);
    }

    /// [`refill_below`](Self::refill_below) with a ceiling of whole units below the capacity
    /// (`capacity - held`, exact).
    pub(crate) fn refill_below_held(&mut self, held: u64, now: Instant) {
        let ceiling = self.full() - self.scaled(held);
        self.refill_under(ceiling, now);
    }

    fn refill_under(&mut self, ceiling: i128, now: Instant) {
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
        let ceiling = self.scaled_ceiling(ceiling);
        self.refund_under(n, ceiling, now);
    }

    /// [`refund_below`](Self::refund_below) with a ceiling of `capacity - held` (exact).
    #[inline]
    pub(crate) fn refund_below_held(&mut self, n: u64, held: u64, now: Instant) {
        if held == 0 {
            return self.refund(n, now);
        }
        let ceiling = self.full() - self.scaled(held);
        self.refund_under(n, ceiling, now);
    }

    #[inline]
    fn refund_under(&mut self, n: u64, ceiling: i128, now: Instant) {
        self.refill(now);
        let before = self.level;
        self.level = (self.level + self.scaled(n)).min(self.full());
        if self.level > ceiling {
            self.level = before.max(ceiling).min(self.level);
        }
    }

    /// Re-seeds the level from an outside view (e.g. the server's `remaining`), never above
    /// capacity. Use [`TokenBucket::lower_to`] to only ever tighten.
    pub fn set_level(&mut self, level: u64, now: Instant) {
        self.refill(now);
        self.level = self.scaled(level).min(self.full());
    }

    /// Lowers the level to `level` if it is currently higher (the server knows of usage we did
    /// not see, e.g. other clients of the same organisation).
    pub fn lower_to(&mut self, level: u64, now: Instant) {
        self.refill(now);
        let level = self.scaled(level).min(self.full());
        if level < self.level {
            self.level = level;
        }
    }

    /// Changes the capacity (per-period limit), keeping the same period and the level clamped
    /// to the new capacity.
    pub fn set_capacity(&mut self, capacity: u64, now: Instant) {
        self.refill(now);
        self.capacity = capacity.min(MAX_CAPACITY);
        self.full = self.capacity as i128 * self.period as i128;
        let full = self.full;
        self.level = self.level.clamp(-full, full);
    }

    /// Whether the bucket is full at `now` (an idle bucket carries no state worth keeping).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.full()
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

    /// `time_until`'s in-line answer (a bucket refilled at `now` that holds `n`) is the one
    /// the whole computation gives, and every other state goes to the whole computation:
    /// levels full, partly taken, empty and in debt, asked at, before and after the last
    /// refill, for amounts within, at and beyond the level and the capacity.
    #[test]
    fn the_in_line_wait_is_the_computed_one() {
        let t0 = Instant::now();
        for taken in [0, 1, 30, 59, 60, 90] {
            let mut b = TokenBucket::per_minute(60, t0);
            b.force_take(taken, t0);
            for at in [0, 1, 999, 1_000, 30_000, 120_000] {
                let now = t0 + Duration::from_millis(at);
                for n in [0, 1, 2, 29, 30, 31, 59, 60, 61] {
                    assert_eq!(
                        b.time_until(n, now),
                        (n <= 60).then(|| b.time_until_refilled(n, now)).flatten(),
                        "taken {taken}, at {at} ms, n {n}"
                    );
                }
            }
            // Asked before the last refill (another request's `now`, a moment earlier).
            let later = t0 + Duration::from_secs(2);
            b.force_take(0, later);
            for n in [0, 1, 30, 60] {
                assert_eq!(
                    b.time_until(n, t0),
                    b.time_until_refilled(n, t0),
                    "taken {taken}, n {n}"
                );
            }
        }
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

    /// Issue 12, ninth pass: the level refilled in steps is the level refilled at once, so
    /// a unit that `time_until` says is there after 0.5 s is there however the 0.5 s were
    /// cut (in `f64`, 0.285 + 0.157 + 0.058 s at 2 units a second left 0.9999999999999999).
    #[test]
    fn a_refill_in_steps_is_the_refill_at_once() {
        let t0 = Instant::now();
        let mut steps = TokenBucket::per_minute(120, t0);
        steps.force_take(120, t0);
        let mut once = steps.clone();
        assert_eq!(once.time_until(1, t0), Some(Duration::from_millis(500)));
        let mut t = t0;
        for ms in [285, 157, 58] {
            t += Duration::from_millis(ms);
            steps.refill(t);
        }
        once.refill(t);
        assert_eq!(steps, once);
        assert_eq!(steps.level(t), 1.0);
        assert!(steps.try_take(1, t).is_ok());
        assert_eq!(steps.time_until(1, t), Some(Duration::from_millis(500)));
        assert_eq!(
            steps.time_until(1, t + Duration::from_nanos(1)),
            Some(Duration::from_nanos(499_999_999))
        );
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

    /// `refill_in` divides in 64 bits when the scaled units fit: the same whole units as the
    /// 128-bit quotient on both sides of that bound (products just below, at and above
    /// `u64::MAX`), for small, per-minute and the largest capacities and periods.
    #[test]
    fn refill_in_is_the_exact_quotient_on_both_sides_of_64_bits() {
        let t0 = Instant::now();
        let periods = [1, 7, 1_000_000_000, 60_000_000_000, MAX_PERIOD_NS];
        let capacities = [1, 3, 60, 1_000_000_000_000, u64::MAX >> 20, MAX_CAPACITY];
        for period in periods {
            for capacity in capacities {
                let b = TokenBucket::new(capacity, Duration::from_nanos(period), t0);
                // Elapsed times around the one whose product is `u64::MAX`, and the edges.
                let at_bound = u64::MAX / capacity;
                let mut nanos = vec![0, 1, period - 1, period, period + 1, 2 * period];
                nanos.extend([
                    at_bound - 1,
                    at_bound,
                    at_bound.saturating_add(1),
                    at_bound.saturating_add(2),
                ]);
                nanos.push(u64::MAX);
                for n in nanos {
                    let expected = (u128::from(n.min(2 * period)) * u128::from(capacity)
                        / u128::from(period)) as u64;
                    assert_eq!(
                        b.refill_in(Duration::from_nanos(n)),
                        expected,
                        "capacity {capacity}, period {period}, {n} ns"
                    );
                }
            }
        }
    }
}
