//! How long to wait before the next attempt.
//!
//! In order of precedence:
//!
//! 1. the server's delay: `retry-after-ms`, then `retry-after` (seconds or an HTTP date), read
//!    with [`crate::anthropic::retry_after`];
//! 2. for a 429 only, the `anthropic-ratelimit-*-reset` time of the exhausted bucket(s) (those
//!    whose `remaining` is 0; the latest reset wins, since the request needs all of them). Not
//!    for a 529 or a 5xx: token counts are rounded down to thousands, so a `remaining` of 0
//!    beside an overload does not mean the quota is the problem, and a reset is the time the
//!    bucket is *full*, far longer than an overload lasts;
//! 3. otherwise exponential backoff with [`Jitter`] (decorrelated by default).
//!
//! A server delay is a floor: the layer never waits less than the server asked (except when
//! the layer's `max_delay` cap is lower). On top of it the layer adds a positive *spread*,
//! uniform in `[0, spread)`: callers that were told the same whole-second `retry-after` (or
//! the same reset time) then come back at different instants instead of colliding again.
//! A precise `retry-after-ms` (or fractional `retry-after`) gets a smaller spread, at most a
//! quarter of the delay.
//!
//! The backoff base is lengthened by the 429 *penalty* of the request's (API key, rate-limit
//! group): the first 429 costs nothing, each further consecutive one doubles the base (up to
//! [`MAX_PENALTY_LEVEL`] doublings), and each success takes one 429 off the streak. A 429
//! with a server delay is in addition paced: see the `pacing` module.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::anthropic::{RateLimitSnapshot, header_names, retry_after};

/// The highest penalty level: the backoff base is multiplied by at most `2^4 = 16`.
pub(crate) const MAX_PENALTY_LEVEL: u32 = 4;

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

impl BackoffState {
    /// The state of a request needing `need`.
    pub(crate) fn new(need: Need) -> Self {
        Self {
            need,
            ..Self::default()
        }
    }
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

/// What one request needs from the quota (from its `RequestMeta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Need {
    /// Estimated input tokens.
    pub(crate) input_tokens: u64,
    /// `max_tokens` (what a limiter reserves for the output).
    pub(crate) output_tokens: u64,
}

/// The per-request backoff state.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackoffState {
    /// What the request needs from the quota.
    need: Need,
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

/// How long the limits in `headers` take to admit one request needing `need`: for each bucket
/// with a known per-minute limit, the minute's share the request uses; the slowest bucket
/// wins. `None` without any limit header.
pub(crate) fn admission_interval(headers: &HeaderMap, need: Need) -> Option<Duration> {
    let snap = RateLimitSnapshot::from_headers(headers);
    let share = |limit: Option<u64>, amount: u64| -> Option<Duration> {
        let limit = limit.filter(|l| *l > 0)?;
        let amount = amount.min(limit) as f64;
        Some(Duration::from_secs_f64(60.0 * amount / limit as f64))
    };
    [
        share(snap.requests.limit, 1),
        share(snap.input_tokens.limit, need.input_tokens),
        share(snap.output_tokens.limit, need.output_tokens),
    ]
    .into_iter()
    .flatten()
    .max()
}

/// The next wait, and for a rate-limited request the time its quota needs to admit one
/// request like it (for pacing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delay {
    /// How long to wait (capped at `max_delay`).
    pub(crate) wait: Duration,
    /// Where the wait came from.
    pub(crate) source: DelaySource,
    /// For a 429 with a server delay or an exhausted bucket's reset: the time to admit one
    /// request, the largest share of a per-minute limit the request uses, at most `wait`.
    pub(crate) admission: Option<Duration>,
}

/// Whether the request needs more than a whole per-minute limit of `headers`.
fn exceeds_a_limit(headers: &HeaderMap, need: Need) -> bool {
    let snap = RateLimitSnapshot::from_headers(headers);
    let over = |limit: Option<u64>, amount: u64| limit.is_some_and(|l| amount > l);
    over(snap.input_tokens.limit, need.input_tokens)
        || over(snap.output_tokens.limit, need.output_tokens)
}

/// Computes the next wait.
///
/// `headers` are those of the failed response (none for a connection error or a mid-stream
/// error), `rate_limited` whether it was a 429, `penalty` the current penalty level of the
/// request's key and group.
pub(crate) fn next_delay(
    config: &BackoffConfig,
    state: &mut BackoffState,
    headers: Option<&HeaderMap>,
    rate_limited: bool,
    penalty: u32,
    rng: &mut fastrand::Rng,
    now: SystemTime,
) -> Delay {
    let penalty = penalty.min(MAX_PENALTY_LEVEL);
    let base = scaled(config.base, penalty).min(config.max_backoff.max(config.base));
    let server = headers.and_then(|h| server_delay(h, now));
    let (delay, source) = if let Some((delay, precise)) = server {
        let window = if precise {
            config.spread.min(delay / 4)
        } else {
            config.spread
        };
        (
            delay.saturating_add(uniform(rng, window)),
            DelaySource::Server,
        )
    } else if let Some(delay) = headers
        .filter(|_| rate_limited)
        .and_then(|h| reset_delay(h, now))
    {
        (
            delay.saturating_add(uniform(rng, config.spread)),
            DelaySource::Reset,
        )
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
    let wait = delay.min(config.max_delay);
    let admission = match (rate_limited, source, headers) {
        // A request larger than a whole limit is not paced: it would hold every other request
        // of its key and group behind a slot it may never use.
        (true, DelaySource::Server | DelaySource::Reset, Some(h))
            if !exceeds_a_limit(h, state.need) =>
        {
            Some(admission_interval(h, state.need).map_or(wait, |interval| interval.min(wait)))
        }
        _ => None,
    };
    Delay {
        wait,
        source,
        admission,
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
        let d = delay_full(h, seed);
        (d.wait, d.source)
    }

    fn delay_full(h: &HeaderMap, seed: u64) -> Delay {
        let mut rng = fastrand::Rng::with_seed(seed);
        next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(h),
            true,
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
        let Delay {
            wait: d,
            source: src,
            ..
        } = next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(&h),
            true,
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
        let Delay {
            wait: d,
            source: src,
            ..
        } = next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(&h),
            true,
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
    fn reset_is_ignored_for_overloads() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let reset = time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + 50)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let h = headers(&[
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            ("anthropic-ratelimit-output-tokens-reset", &reset),
        ]);
        let mut rng = fastrand::Rng::with_seed(3);
        let Delay {
            wait: d,
            source: src,
            ..
        } = next_delay(
            &cfg(Jitter::None),
            &mut BackoffState::default(),
            Some(&h),
            false,
            0,
            &mut rng,
            now,
        );
        assert_eq!(src, DelaySource::Backoff);
        assert_eq!(d, Duration::from_millis(500));
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
                let Delay {
                    wait: d,
                    source: src,
                    ..
                } = next_delay(
                    &config,
                    &mut state,
                    None,
                    false,
                    0,
                    &mut rng,
                    SystemTime::now(),
                );
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
                let Delay {
                    wait: d, source: _, ..
                } = next_delay(
                    &config,
                    &mut state,
                    None,
                    false,
                    0,
                    &mut rng,
                    SystemTime::now(),
                );
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
        let Delay {
            wait: plain,
            source: _,
            ..
        } = next_delay(
            &config,
            &mut BackoffState::default(),
            None,
            false,
            0,
            &mut rng,
            SystemTime::now(),
        );
        let Delay {
            wait: penalised,
            source: _,
            ..
        } = next_delay(
            &config,
            &mut BackoffState::default(),
            None,
            false,
            3,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(plain, Duration::from_millis(500));
        assert_eq!(penalised, Duration::from_secs(4));

        let h = headers(&[("retry-after", "600")]);
        let Delay {
            wait: capped,
            source: _,
            ..
        } = next_delay(
            &config,
            &mut BackoffState::default(),
            Some(&h),
            true,
            0,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(capped, config.max_delay);
    }

    #[test]
    fn rate_limited_delays_carry_the_admission_time() {
        let h = headers(&[
            ("retry-after", "2"),
            ("anthropic-ratelimit-requests-limit", "120"),
        ]);
        let d = delay_full(&h, 1);
        assert_eq!(d.admission, Some(Duration::from_millis(500)));
        // Without a limit header: the wait itself.
        let h = headers(&[("retry-after", "2")]);
        let d = delay_full(&h, 1);
        assert_eq!(d.admission, Some(d.wait));
        // Not for an overload.
        let mut rng = fastrand::Rng::with_seed(1);
        let d = next_delay(
            &BackoffConfig::default(),
            &mut BackoffState::default(),
            Some(&h),
            false,
            0,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(d.source, DelaySource::Server);
        assert_eq!(d.admission, None);
        // Nor for a request larger than a whole limit.
        let h = headers(&[
            ("retry-after", "60"),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
        ]);
        let mut state = BackoffState::new(Need {
            input_tokens: 50_000,
            output_tokens: 100,
        });
        let d = next_delay(
            &BackoffConfig::default(),
            &mut state,
            Some(&h),
            true,
            0,
            &mut rng,
            SystemTime::now(),
        );
        assert_eq!(d.admission, None);
    }

    #[test]
    fn admission_interval_takes_the_slowest_bucket() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "600"),
            ("anthropic-ratelimit-input-tokens-limit", "60000"),
            ("anthropic-ratelimit-output-tokens-limit", "bogus"),
        ]);
        let need = Need {
            input_tokens: 2000,
            output_tokens: 4096,
        };
        // Requests: 0.1 s; input tokens: 2 s; output: unknown.
        assert_eq!(admission_interval(&h, need), Some(Duration::from_secs(2)));
        assert_eq!(admission_interval(&HeaderMap::new(), need), None);
        // A request larger than the limit needs the whole minute, not more.
        let need = Need {
            input_tokens: 1_000_000,
            output_tokens: 0,
        };
        assert_eq!(admission_interval(&h, need), Some(Duration::from_secs(60)));
    }

    mod bounds {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[0-9]{0,12}",
                "[0-9]{0,4}\\.[0-9]{0,4}",
                "-?[0-9a-zA-Z ,.:+]{0,30}",
            ]
        }

        proptest! {
            /// Whatever the headers and state, a wait never exceeds `max_delay`, and a valid
            /// server delay is honoured up to that cap.
            #[test]
            fn waits_are_capped_and_server_delays_honoured(
                retry_after in proptest::option::of(value()),
                retry_after_ms in proptest::option::of(value()),
                limit in proptest::option::of(value()),
                penalty in 0u32..10,
                calls in 1usize..12,
                rate_limited in any::<bool>(),
                seed in any::<u64>(),
                jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)],
            ) {
                let mut h = HeaderMap::new();
                for (name, v) in [
                    ("retry-after", &retry_after),
                    ("retry-after-ms", &retry_after_ms),
                    ("anthropic-ratelimit-requests-limit", &limit),
                ] {
                    if let Some(Ok(v)) = v.as_ref().map(|v| v.parse::<http::HeaderValue>()) {
                        h.insert(name, v);
                    }
                }
                let config = cfg(jitter);
                let mut state = BackoffState::default();
                let mut rng = fastrand::Rng::with_seed(seed);
                let now = SystemTime::now();
                for _ in 0..calls {
                    let d = next_delay(&config, &mut state, Some(&h), rate_limited, penalty, &mut rng, now);
                    prop_assert!(d.wait <= config.max_delay);
                    if let Some((server, _)) = server_delay(&h, now) {
                        prop_assert_eq!(d.source, DelaySource::Server);
                        prop_assert!(d.wait >= server.min(config.max_delay));
                    }
                    if let Some(admission) = d.admission {
                        prop_assert!(rate_limited && admission <= d.wait);
                    }
                }
            }
        }
    }
}
