//! How long to wait before the next attempt.
//!
//! In order of precedence:
//!
//! 1. the server's delay: `retry-after-ms`, then `retry-after` (seconds or an HTTP date), read
//!    with [`crate::anthropic::retry_after`];
//! 2. the `anthropic-ratelimit-*-reset` time of the exhausted bucket(s) (those whose
//!    `remaining` is 0; the latest reset wins, since the request needs all of them);
//! 3. otherwise exponential backoff with [`Jitter`] (decorrelated by default).
//!
//! A server delay is a floor: the layer never waits less than the server asked (except when
//! the layer's `max_delay` cap is lower). On top of it the layer adds a positive *spread*,
//! uniform in `[0, spread)`: callers that were told the same whole-second `retry-after` (or
//! the same reset time) then come back at different instants instead of colliding again.
//! A precise `retry-after-ms` (or fractional `retry-after`) gets a smaller spread, at most a
//! quarter of the delay.
//!
//! Consecutive 429s on one (API key, rate-limit group) raise a *penalty level* shared by every
//! request of that key and group: the first 429 costs nothing, each further one doubles the
//! backoff base (up to [`MAX_PENALTY_LEVEL`] doublings), and server-given delays get an extra
//! random wait of up to the penalised base. Each success on the key and group takes one 429
//! off the streak.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::anthropic::{KeyId, RateLimitGroup, RateLimitSnapshot, header_names, retry_after};

/// The highest penalty level: the backoff base is multiplied by at most `2^4 = 16`.
pub const MAX_PENALTY_LEVEL: u32 = 4;

/// How exponential backoff is randomised when the server gave no delay.
///
/// The default is [`Jitter::Decorrelated`]: each wait is drawn uniformly between the base
/// delay and three times the previous wait (capped). Like full jitter it spreads a crowd of
/// failing callers over the whole window (AWS's analysis of backoff schemes found the two
/// about equal, and far better than fixed or "equal" jitter, which keep callers in step), but
/// it never waits less than the base, so an overloaded server (529, which sends no delay) is
/// never hit again immediately, and it grows from the request's own previous wait, so
/// requests that started at different times drift apart.
///
/// ```
/// use tower_claude::retry::{Jitter, RetryLayer};
///
/// let layer = RetryLayer::new().jitter(Jitter::Full);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// No randomness: `min(max_backoff, base * 2^n)`. Keeps failing callers in step; only
    /// for tests and single callers.
    None,
    /// Uniform in `[0, min(max_backoff, base * 2^n)]`.
    Full,
    /// Half fixed, half random: `v / 2 + uniform(0, v / 2)` with `v = min(max_backoff, base * 2^n)`.
    Equal,
    /// `min(max_backoff, uniform(base, 3 * previous))`, starting from `previous = base`.
    #[default]
    Decorrelated,
}

/// Backoff parameters (set through [`RetryLayer`](super::RetryLayer)).
#[derive(Debug, Clone)]
pub(crate) struct BackoffConfig {
    pub(crate) base: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) spread: Duration,
    pub(crate) jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_delay: Duration::from_secs(90),
            spread: Duration::from_secs(1),
            jitter: Jitter::Decorrelated,
        }
    }
}

/// Where a delay came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DelaySource {
    /// `retry-after-ms` / `retry-after`.
    Server,
    /// `anthropic-ratelimit-*-reset` of an exhausted bucket.
    Reset,
    /// Exponential backoff.
    Backoff,
}

/// The per-request backoff state.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackoffState {
    /// Backoff-computed retries so far.
    retries: u32,
    /// The previous backoff wait (for decorrelated jitter).
    previous: Option<Duration>,
}

/// A uniform duration in `[0, max]` (0 when `max` is 0).
fn uniform(rng: &mut fastrand::Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(rng.u64(0..=nanos))
    }
}

/// A uniform duration in `[lo, hi]`.
fn between(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        lo
    } else {
        lo + uniform(rng, hi - lo)
    }
}

/// `base * 2^level`, saturating.
fn scaled(base: Duration, exp: u32) -> Duration {
    base.checked_mul(1u32 << exp.min(31))
        .unwrap_or(Duration::MAX)
}

/// The server-given delay and whether it is precise (milliseconds / fractional seconds) rather
/// than whole seconds.
pub(crate) fn server_delay(headers: &HeaderMap, now: SystemTime) -> Option<(Duration, bool)> {
    let delay = retry_after(headers, now)?;
    let precise = headers
        .get(header_names::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .is_some_and(|ms| ms.is_finite() && ms >= 0.0)
        || delay.subsec_nanos() != 0;
    Some((delay, precise))
}

/// The time until the latest reset among exhausted buckets (`remaining == 0`).
pub(crate) fn reset_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let snap = RateLimitSnapshot::from_headers(headers);
    [
        snap.requests,
        snap.tokens,
        snap.input_tokens,
        snap.output_tokens,
    ]
    .iter()
    .filter(|b| b.remaining == Some(0))
    .filter_map(|b| b.reset)
    .map(|reset| reset.duration_since(now).unwrap_or(Duration::ZERO))
    .max()
}

/// Computes the next wait.
///
/// `headers` are those of the failed response (none for a connection error or a mid-stream
/// error), `penalty` the current penalty level of the request's key and group.
pub(crate) fn next_delay(
    config: &BackoffConfig,
    state: &mut BackoffState,
    headers: Option<&HeaderMap>,
    penalty: u32,
    rng: &mut fastrand::Rng,
    now: SystemTime,
) -> (Duration, DelaySource) {
    let penalty = penalty.min(MAX_PENALTY_LEVEL);
    let base = scaled(config.base, penalty).min(config.max_backoff.max(config.base));
    let penalty_extra = |rng: &mut fastrand::Rng| {
        if penalty == 0 {
            Duration::ZERO
        } else {
            uniform(rng, base)
        }
    };
    let server = headers.and_then(|h| server_delay(h, now));
    let (delay, source) = if let Some((delay, precise)) = server {
        let window = if precise {
            config.spread.min(delay / 4)
        } else {
            config.spread
        };
        let extra = uniform(rng, window) + penalty_extra(rng);
        (delay.saturating_add(extra), DelaySource::Server)
    } else if let Some(delay) = headers.and_then(|h| reset_delay(h, now)) {
        let extra = uniform(rng, config.spread) + penalty_extra(rng);
        (delay.saturating_add(extra), DelaySource::Reset)
    } else {
        let cap = config.max_backoff;
        let exp = scaled(base, state.retries).min(cap);
        let delay = match config.jitter {
            Jitter::None => exp,
            Jitter::Full => uniform(rng, exp),
            Jitter::Equal => exp / 2 + uniform(rng, exp / 2),
            Jitter::Decorrelated => {
                let previous = state.previous.unwrap_or(base).max(base);
                between(rng, base, previous.saturating_mul(3)).min(cap)
            }
        };
        state.retries = state.retries.saturating_add(1);
        state.previous = Some(delay);
        (delay, DelaySource::Backoff)
    };
    (delay.min(config.max_delay), source)
}

/// The 429 streaks per (key, rate-limit group), shared by every clone of a layer. The penalty
/// level is the streak minus one.
#[derive(Debug, Default)]
pub(crate) struct Penalties {
    levels: Mutex<HashMap<(KeyId, RateLimitGroup), u32>>,
}

impl Penalties {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<(KeyId, RateLimitGroup), u32>) -> R) -> R {
        let mut map = self.levels.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut map)
    }

    /// The current penalty level: consecutive 429s beyond the first.
    pub(crate) fn level(&self, key: &(KeyId, RateLimitGroup)) -> u32 {
        self.with(|m| m.get(key).copied().unwrap_or(0).saturating_sub(1))
    }

    /// A 429 (rate limit) on the key and group: the streak grows.
    pub(crate) fn rate_limited(&self, key: &(KeyId, RateLimitGroup)) {
        self.with(|m| {
            let streak = m.entry(key.clone()).or_insert(0);
            *streak = (*streak + 1).min(MAX_PENALTY_LEVEL + 1);
        });
    }

    /// A success on the key and group: the streak shrinks by one.
    pub(crate) fn succeeded(&self, key: &(KeyId, RateLimitGroup)) {
        self.with(|m| {
            if let Some(level) = m.get_mut(key) {
                *level = level.saturating_sub(1);
                if *level == 0 {
                    m.remove(key);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(jitter: Jitter) -> BackoffConfig {
        BackoffConfig {
            jitter,
            ..BackoffConfig::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn delay_for(h: &HeaderMap, seed: u64) -> (Duration, DelaySource) {
        let mut rng = fastrand::Rng::with_seed(seed);
        next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(h),
            0,
            &mut rng,
            SystemTime::now(),
        )
    }

    #[test]
    fn retry_after_seconds_is_a_floor_with_up_to_one_second_spread() {
        let h = headers(&[("retry-after", "2")]);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let (d, src) = delay_for(&h, seed);
            assert_eq!(src, DelaySource::Server);
            assert!(d >= Duration::from_secs(2), "{d:?}");
            assert!(d <= Duration::from_secs(3), "{d:?}");
            seen.insert(d.as_millis() / 100);
        }
        // Spread over the whole second, not a single instant.
        assert!(seen.len() >= 8, "{seen:?}");
    }

    #[test]
    fn retry_after_ms_wins_and_gets_a_small_spread() {
        let h = headers(&[("retry-after", "9"), ("retry-after-ms", "400")]);
        for seed in 0..100 {
            let (d, src) = delay_for(&h, seed);
            assert_eq!(src, DelaySource::Server);
            assert!(
                d >= Duration::from_millis(400) && d <= Duration::from_millis(500),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retry_after_http_date_is_honoured() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now + Duration::from_secs(5));
        let h = headers(&[("retry-after", &date)]);
        let mut rng = fastrand::Rng::with_seed(1);
        let (d, src) = next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(&h),
            0,
            &mut rng,
            now,
        );
        assert_eq!(src, DelaySource::Server);
        // HTTP dates have whole-second precision.
        assert!(
            d >= Duration::from_secs(4) && d <= Duration::from_secs(6),
            "{d:?}"
        );
    }

    #[test]
    fn exhausted_bucket_reset_is_used_without_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let reset = time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + 7)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let later = time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + 30)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let h = headers(&[
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            ("anthropic-ratelimit-output-tokens-reset", &reset),
            // Not exhausted: its later reset is ignored.
            ("anthropic-ratelimit-requests-remaining", "12"),
            ("anthropic-ratelimit-requests-reset", &later),
        ]);
        let mut rng = fastrand::Rng::with_seed(3);
        let (d, src) = next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(&h),
            0,
            &mut rng,
            now,
        );
        assert_eq!(src, DelaySource::Reset);
        assert!(
            d >= Duration::from_secs(7) && d <= Duration::from_secs(8),
            "{d:?}"
        );
    }

    #[test]
    fn backoff_without_server_hint_stays_within_bounds() {
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let config = cfg(jitter);
            let mut state = BackoffState::default();
            let mut rng = fastrand::Rng::with_seed(9);
            for n in 0..20u32 {
                let (d, src) =
                    next_delay(&config, &mut state, None, 0, &mut rng, SystemTime::now());
                assert_eq!(src, DelaySource::Backoff);
                assert!(d <= config.max_backoff, "{jitter:?} {n} {d:?}");
                if matches!(jitter, Jitter::Decorrelated | Jitter::None) {
                    assert!(d >= config.base, "{jitter:?} {n} {d:?}");
                }
                if jitter == Jitter::None {
                    assert_eq!(d, scaled(config.base, n).min(config.max_backoff));
                }
            }
        }
    }

    #[test]
    fn decorrelated_backoff_grows_and_spreads() {
        let config = cfg(Jitter::Decorrelated);
        let mut firsts = std::collections::HashSet::new();
        let mut fifths = Vec::new();
        for seed in 0..100 {
            let mut state = BackoffState::default();
            let mut rng = fastrand::Rng::with_seed(seed);
            for i in 0..5 {
                let (d, _) = next_delay(&config, &mut state, None, 0, &mut rng, SystemTime::now());
                if i == 0 {
                    firsts.insert(d.as_millis());
                }
                if i == 4 {
                    fifths.push(d);
                }
            }
        }
        assert!(firsts.len() > 50);
        let mean: Duration = fifths.iter().sum::<Duration>() / fifths.len() as u32;
        assert!(mean > Duration::from_secs(2), "{mean:?}");
    }

    #[test]
    fn penalty_lengthens_waits_and_max_delay_caps_everything() {
        let config = cfg(Jitter::None);
        let mut rng = fastrand::Rng::with_seed(1);
        let (plain, _) = next_delay(
            &config,
            &mut BackoffState::default(),
            None,
            0,
            &mut rng,
            SystemTime::now(),
        );
        let (penalised, _) = next_delay(
            &config,
            &mut BackoffState::default(),
            None,
            3,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(plain, Duration::from_millis(500));
        assert_eq!(penalised, Duration::from_secs(4));

        let h = headers(&[("retry-after", "600")]);
        let (capped, _) = next_delay(
            &config,
            &mut BackoffState::default(),
            Some(&h),
            0,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(capped, config.max_delay);
    }

    #[test]
    fn penalties_rise_with_429s_and_relax_with_successes() {
        let p = Penalties::default();
        let key = (KeyId::named("k"), RateLimitGroup::new("claude-opus-4"));
        let other = (KeyId::named("k"), RateLimitGroup::new("claude-haiku-4"));
        for _ in 0..10 {
            p.rate_limited(&key);
        }
        assert_eq!(p.level(&key), MAX_PENALTY_LEVEL);
        assert_eq!(p.level(&other), 0);
        p.succeeded(&key);
        assert_eq!(p.level(&key), MAX_PENALTY_LEVEL - 1);
        let fresh = (KeyId::named("k2"), RateLimitGroup::new("claude-opus-4"));
        p.rate_limited(&fresh);
        assert_eq!(p.level(&fresh), 0, "a single 429 costs nothing");
        p.rate_limited(&fresh);
        assert_eq!(p.level(&fresh), 1);
        for _ in 0..10 {
            p.succeeded(&key);
        }
        assert_eq!(p.level(&key), 0);
    }
}
