//! The simulator's shared state: configuration, buckets, counters, fault queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use tokio::time::Instant;

use crate::anthropic::{BucketSnapshot, KeyId, ModelCatalog, RateLimitGroup, RateLimitSnapshot};
use crate::quota::TokenBucket;

use super::{AccelerationLimit, Fault, MockClaudeBuilder, MockLimits, MockStats};

/// Immutable configuration.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) limits: HashMap<RateLimitGroup, MockLimits>,
    pub(crate) default_limits: MockLimits,
    pub(crate) catalog: ModelCatalog,
    pub(crate) api_keys: Option<HashSet<KeyId>>,
    pub(crate) seed: u64,
    pub(crate) overloaded_rate: f64,
    pub(crate) server_error_rate: f64,
    pub(crate) midstream_error_rate: f64,
    pub(crate) max_in_flight: Option<u64>,
    pub(crate) base_latency: Duration,
    pub(crate) per_token_latency: Duration,
    pub(crate) output_tokens: u64,
    pub(crate) max_body_bytes: usize,
    pub(crate) acceleration: Option<AccelerationLimit>,
}

impl Config {
    pub(crate) fn limits_for(&self, group: &RateLimitGroup) -> MockLimits {
        self.limits
            .get(group)
            .copied()
            .unwrap_or(self.default_limits)
    }
}

/// Maps tokio's clock to wall time, from a pair of readings taken at build.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    pub(crate) fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The wall time of `at`.
    pub(crate) fn wall_at(&self, at: Instant) -> SystemTime {
        if at >= self.mono {
            self.wall + at.duration_since(self.mono)
        } else {
            self.wall - self.mono.duration_since(at)
        }
    }
}

/// Rounds a wall time up to a whole second, as the real API's `*-reset` headers are.
fn ceil_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() > 0 => UNIX_EPOCH + Duration::from_secs(d.as_secs() + 1),
        _ => t,
    }
}

/// The three buckets of one (key, group).
#[derive(Debug)]
pub(crate) struct Buckets {
    pub(crate) requests: TokenBucket,
    pub(crate) input: TokenBucket,
    pub(crate) output: TokenBucket,
    /// Admission times over the last two acceleration windows (kept only when the
    /// acceleration model is on), oldest first.
    pub(crate) admitted: VecDeque<Instant>,
}

impl Buckets {
    fn new(limits: MockLimits, now: Instant) -> Self {
        Self {
            requests: TokenBucket::per_minute(limits.rpm, now),
            input: TokenBucket::per_minute(limits.itpm, now),
            output: TokenBucket::per_minute(limits.otpm, now),
            admitted: VecDeque::new(),
        }
    }

    /// Takes new capacities; a raise adds the extra capacity to the level.
    pub(crate) fn resize(&mut self, limits: MockLimits, now: Instant) {
        let buckets = [&mut self.requests, &mut self.input, &mut self.output];
        for (b, cap) in buckets
            .into_iter()
            .zip([limits.rpm, limits.itpm, limits.otpm])
        {
            let old = b.capacity();
            b.set_capacity(cap, now);
            if cap > old {
                b.refund(cap - old, now);
            }
        }
    }

    /// Forgets admissions older than two windows.
    pub(crate) fn trim_admitted(&mut self, accel: &AccelerationLimit, now: Instant) {
        let keep = accel_window(accel).saturating_mul(2);
        while self
            .admitted
            .front()
            .is_some_and(|&a| now.saturating_duration_since(a) >= keep)
        {
            self.admitted.pop_front();
        }
    }

    /// Whether the acceleration model admits one more request at `at` (no later than every
    /// recorded admission), given the group's RPM limit.
    pub(crate) fn accel_allows(&self, accel: &AccelerationLimit, rpm: u64, at: Instant) -> bool {
        let window = accel_window(accel);
        let per_window = window.as_secs_f64() / 60.0;
        // Admissions strictly after `t` (all of them when `t` is before the clock's origin).
        let after = |t: Option<Instant>| match t {
            Some(t) => self.admitted.len() - self.admitted.partition_point(|&a| a <= t),
            None => self.admitted.len(),
        };
        let recent_start = at.checked_sub(window);
        let previous_start = recent_start.and_then(|t| t.checked_sub(window));
        let recent = after(recent_start);
        let previous = after(previous_start) - recent;
        let previous_rpm = previous as f64 / per_window;
        let rate = (previous_rpm + accel.growth_per_minute as f64).max(accel.floor_rpm as f64);
        if rate >= rpm as f64 {
            // Ramped up to the limit: only the buckets apply.
            return true;
        }
        let ceiling = (rate * per_window).max(1.0);
        // A small tolerance so that rates that divide evenly are not lost to rounding.
        (recent + 1) as f64 <= ceiling + 1e-9
    }

    /// The shortest whole-second wait, at least `at_least`, after which the acceleration
    /// model admits a request (if nothing else is admitted meanwhile). Two windows always
    /// suffice: then nothing recent is left and one request per window is always allowed.
    pub(crate) fn accel_wait(
        &self,
        accel: &AccelerationLimit,
        rpm: u64,
        now: Instant,
        at_least: Duration,
    ) -> Duration {
        let first = at_least.as_secs() + u64::from(at_least.subsec_nanos() > 0);
        let last = first + accel_window(accel).as_secs().saturating_mul(2) + 1;
        (first..=last)
            .map(Duration::from_secs)
            .find(|&wait| self.accel_allows(accel, rpm, now + wait))
            .unwrap_or(Duration::from_secs(last))
    }

    /// The `anthropic-ratelimit-*` headers for the buckets' state at `now`.
    pub(crate) fn write_headers(&mut self, clock: &Clock, now: Instant, headers: &mut HeaderMap) {
        let requests = snapshot(&mut self.requests, clock, now, false);
        let input = snapshot(&mut self.input, clock, now, true);
        let output = snapshot(&mut self.output, clock, now, true);
        // `tokens-*` is the most restrictive of the token limits: the one with less left.
        let tokens = if output.remaining < input.remaining {
            output
        } else {
            input
        };
        RateLimitSnapshot {
            requests,
            tokens,
            input_tokens: input,
            output_tokens: output,
        }
        .write_headers(headers);
    }
}

fn snapshot(bucket: &mut TokenBucket, clock: &Clock, now: Instant, round: bool) -> BucketSnapshot {
    let level = bucket.level(now).max(0.0).floor() as u64;
    // Token counts are rounded down to thousands, like the real API does.
    let remaining = if round { level / 1000 * 1000 } else { level };
    let capacity = bucket.capacity();
    let until_full = bucket.time_until(capacity, now).unwrap_or(Duration::ZERO);
    BucketSnapshot {
        limit: Some(capacity),
        remaining: Some(remaining),
        reset: Some(ceil_to_second(clock.wall_at(now + until_full))),
    }
}

/// The acceleration window, at least a second.
fn accel_window(accel: &AccelerationLimit) -> Duration {
    accel.window.max(Duration::from_secs(1))
}

/// Mutable state behind the lock.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) rng: fastrand::Rng,
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) buckets: HashMap<(KeyId, RateLimitGroup), Buckets>,
    pub(crate) stats: MockStats,
    pub(crate) spend_cap: bool,
    pub(crate) seq: u64,
    /// The prompt cache: prefix id (key, model, prefix) -> expiry.
    pub(crate) prompt_cache: HashMap<u128, Instant>,
    /// Limits set while serving ([`MockClaude::set_limits`](super::MockClaude::set_limits)),
    /// over the configured ones.
    pub(crate) limits_override: Option<MockLimits>,
}

impl Inner {
    pub(crate) fn buckets(
        &mut self,
        key: &KeyId,
        group: &RateLimitGroup,
        limits: MockLimits,
        now: Instant,
    ) -> &mut Buckets {
        self.buckets
            .entry((key.clone(), group.clone()))
            .or_insert_with(|| Buckets::new(limits, now))
    }

    pub(crate) fn count_status(&mut self, status: u16) {
        *self.stats.by_status.entry(status).or_insert(0) += 1;
    }
}

/// State shared by every clone of a simulator.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) clock: Clock,
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new(builder: MockClaudeBuilder) -> Self {
        let catalog = builder.catalog.clone().unwrap_or_default();
        let limits = builder.resolved_limits(&catalog);
        let config = Config {
            limits,
            default_limits: builder.default_limits,
            catalog,
            api_keys: builder.api_keys,
            seed: builder.seed,
            overloaded_rate: builder.overloaded_rate,
            server_error_rate: builder.server_error_rate,
            midstream_error_rate: builder.midstream_error_rate,
            max_in_flight: builder.max_in_flight,
            base_latency: builder.base_latency,
            per_token_latency: builder.per_token_latency,
            output_tokens: builder.output_tokens,
            max_body_bytes: builder.max_body_bytes,
            acceleration: builder.acceleration,
        };
        let inner = Inner {
            rng: fastrand::Rng::with_seed(builder.seed),
            faults: VecDeque::new(),
            buckets: HashMap::new(),
            stats: MockStats::default(),
            spend_cap: builder.spend_cap,
            seq: 0,
            prompt_cache: HashMap::new(),
            limits_override: None,
        };
        Self {
            config,
            clock: Clock::now(),
            inner: Mutex::new(inner),
        }
    }

    /// Locks the state; a poisoned lock is still usable (the state stays consistent: every
    /// update is a few plain assignments).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An admitted request until its answer ends: holds the in-flight slot and the output
/// reservation, settled once when the body is fully sent, or when it is dropped.
#[derive(Debug)]
pub(crate) struct Flight {
    shared: Arc<Shared>,
    key: KeyId,
    group: RateLimitGroup,
    reserved_output: u64,
    sent_output: u64,
    done: bool,
}

impl Flight {
    /// Registers a new flight (the caller holds the lock and passes the state).
    pub(crate) fn start(
        shared: Arc<Shared>,
        inner: &mut Inner,
        key: KeyId,
        group: RateLimitGroup,
        reserved_output: u64,
    ) -> Self {
        inner.stats.in_flight += 1;
        inner.stats.max_in_flight = inner.stats.max_in_flight.max(inner.stats.in_flight);
        Self {
            shared,
            key,
            group,
            reserved_output,
            sent_output: 0,
            done: false,
        }
    }

    /// Records that `tokens` output tokens (cumulative) have been sent.
    pub(crate) fn sent(&mut self, tokens: u64) {
        self.sent_output = self.sent_output.max(tokens);
    }

    /// Ends the flight: frees the slot, refunds the unused output reservation (or charges the
    /// excess), counts the delivered output. Idempotent.
    pub(crate) fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        let mut inner = self.shared.lock();
        inner.stats.in_flight = inner.stats.in_flight.saturating_sub(1);
        *inner
            .stats
            .output_tokens
            .entry(self.group.as_str().to_owned())
            .or_insert(0) += self.sent_output;
        if let Some(buckets) = inner
            .buckets
            .get_mut(&(self.key.clone(), self.group.clone()))
        {
            buckets
                .output
                .settle(self.reserved_output, self.sent_output, now);
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_times_round_up_to_seconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(ceil_to_second(t), UNIX_EPOCH + Duration::from_secs(2));
        let whole = UNIX_EPOCH + Duration::from_secs(3);
        assert_eq!(ceil_to_second(whole), whole);
    }

    #[tokio::test(start_paused = true)]
    async fn clock_maps_instants_to_wall_time() {
        let clock = Clock::now();
        let later = Instant::now() + Duration::from_secs(90);
        assert_eq!(
            clock.wall_at(later).duration_since(clock.wall).unwrap(),
            Duration::from_secs(90)
        );
    }
}
