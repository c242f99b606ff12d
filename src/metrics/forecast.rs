//! Demand forecasting per rate-limit group with Holt's linear (double exponential) smoothing.
//!
//! Demand (requests, input tokens, output tokens) is summed over fixed intervals (10 s by
//! default); each closed interval, converted to a per-minute rate, updates one Holt model per
//! bucket, and the forecast `horizon` ahead is `level + trend * horizon / interval`.
//!
//! Why Holt: demand that ramps up is exactly the case where a moving average lags (it forecasts
//! the past), while Holt tracks a level *and* a slope with two constant-time updates and no
//! history buffer. Seasonality (Holt-Winters) would need days of history at minute resolution,
//! which a process restarted every deploy does not have, and an ARIMA fit costs far more than
//! a request. The forecast never goes below zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::names;
use crate::anthropic::RateLimitGroup;

/// Holt's linear exponential smoothing of one series.
///
/// ```
/// use tower_claude::metrics::forecast::Holt;
///
/// let mut holt = Holt::new(0.5, 0.3);
/// for step in 1..=20 {
///     holt.update(f64::from(step) * 10.0); // 10, 20, ..., 200
/// }
/// // The ramp of +10 per step is extrapolated: the next value is about 210.
/// let next = holt.forecast(1.0).unwrap();
/// assert!((next - 210.0).abs() < 1.0, "{next}");
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    level: Option<f64>,
    trend: f64,
}

impl Holt {
    /// A model with level smoothing `alpha` and trend smoothing `beta` (each clamped to
    /// `0.01..=1.0`; a non-finite value becomes 0.5).
    pub fn new(alpha: f64, beta: f64) -> Self {
        let clamp = |v: f64| {
            if v.is_finite() {
                v.clamp(0.01, 1.0)
            } else {
                0.5
            }
        };
        Self {
            alpha: clamp(alpha),
            beta: clamp(beta),
            level: None,
            trend: 0.0,
        }
    }

    /// Adds an observation (non-finite values are ignored).
    pub fn update(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        match self.level {
            None => self.level = Some(x),
            Some(level) => {
                let new_level = self.alpha * x + (1.0 - self.alpha) * (level + self.trend);
                self.trend = self.beta * (new_level - level) + (1.0 - self.beta) * self.trend;
                self.level = Some(new_level);
            }
        }
    }

    /// The forecast `steps` intervals ahead (never negative); `None` before any observation.
    pub fn forecast(&self, steps: f64) -> Option<f64> {
        self.level.map(|l| (l + self.trend * steps).max(0.0))
    }

    /// The current level; `None` before any observation.
    pub fn level(&self) -> Option<f64> {
        self.level
    }

    /// The current trend per step.
    pub fn trend(&self) -> f64 {
        self.trend
    }
}

/// Demand per minute in the three buckets Anthropic limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Requests per minute.
    pub requests: f64,
    /// Input tokens per minute.
    pub input_tokens: f64,
    /// Output tokens per minute.
    pub output_tokens: f64,
}

impl Rates {
    fn as_array(&self) -> [f64; 3] {
        [self.requests, self.input_tokens, self.output_tokens]
    }

    fn from_array(a: [f64; 3]) -> Self {
        Self {
            requests: a[0],
            input_tokens: a[1],
            output_tokens: a[2],
        }
    }
}

/// What the [`Forecaster`] knows about one group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forecast {
    /// Demand per minute measured over the last closed interval.
    pub demand: Rates,
    /// The Holt forecast of demand per minute, `horizon` ahead.
    pub forecast: Rates,
    /// Closed intervals seen so far.
    pub intervals: u64,
}

#[derive(Debug, Clone)]
struct Series {
    bin_start: Instant,
    bin: [f64; 3],
    models: [Holt; 3],
    last: [f64; 3],
    intervals: u64,
}

#[derive(Debug)]
struct Inner {
    interval: Duration,
    horizon: Duration,
    alpha: f64,
    beta: f64,
    groups: Mutex<HashMap<RateLimitGroup, Series>>,
}

/// Per-group demand forecasts, shared (cheap `Clone`) between the
/// [`MetricsLayer`](super::MetricsLayer), which feeds it, and the
/// [`PacingLayer`](super::pacing::PacingLayer), which reads it.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::anthropic::RateLimitGroup;
/// use tower_claude::metrics::forecast::Forecaster;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let forecaster = Forecaster::new();
/// let group = RateLimitGroup::new("claude-sonnet-4");
/// // Demand ramps from 6 to 60 requests per minute over 10 intervals of 10 s.
/// for step in 1..=10u64 {
///     for _ in 0..step {
///         forecaster.record(&group, 1, 1_000, 0);
///     }
///     tokio::time::advance(Duration::from_secs(10)).await;
/// }
/// let f = forecaster.forecast(&group).unwrap();
/// assert_eq!(f.demand.requests, 60.0);
/// assert!(f.forecast.requests > 60.0); // the ramp is extrapolated a minute ahead
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Forecaster {
    inner: Arc<Inner>,
}

impl Default for Forecaster {
    fn default() -> Self {
        Self::new()
    }
}

/// Closing more empty intervals than this in one go resets the series instead.
const MAX_CATCH_UP: u32 = 360;

impl Forecaster {
    /// Intervals of 10 s, a horizon of 60 s, `alpha = 0.5`, `beta = 0.3`.
    pub fn new() -> Self {
        Self::with_config(Duration::from_secs(10), Duration::from_secs(60), 0.5, 0.3)
    }

    /// A forecaster with the given interval (at least 1 ms), horizon and smoothing factors.
    pub fn with_config(interval: Duration, horizon: Duration, alpha: f64, beta: f64) -> Self {
        Self {
            inner: Arc::new(Inner {
                interval: interval.max(Duration::from_millis(1)),
                horizon,
                alpha,
                beta,
                groups: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The interval demand is summed over.
    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// How far ahead [`forecast`](Self::forecast) looks.
    pub fn horizon(&self) -> Duration {
        self.inner.horizon
    }

    /// Records demand of `group` now: requests, input tokens and output tokens.
    pub fn record(&self, group: &RateLimitGroup, requests: u64, input: u64, output: u64) {
        let now = Instant::now();
        let mut groups = self.lock();
        let series = groups.entry(group.clone()).or_insert_with(|| Series {
            bin_start: now,
            bin: [0.0; 3],
            models: [Holt::new(self.inner.alpha, self.inner.beta); 3],
            last: [0.0; 3],
            intervals: 0,
        });
        self.roll(series, now);
        for (slot, v) in series.bin.iter_mut().zip([requests, input, output]) {
            *slot += v as f64;
        }
    }

    /// The forecast of `group` (after closing the intervals that ended); `None` before its
    /// first closed interval.
    pub fn forecast(&self, group: &RateLimitGroup) -> Option<Forecast> {
        let now = Instant::now();
        let mut groups = self.lock();
        let series = groups.get_mut(group)?;
        self.roll(series, now);
        self.view(series)
    }

    /// Every group's forecast.
    pub fn forecasts(&self) -> Vec<(RateLimitGroup, Forecast)> {
        let now = Instant::now();
        let mut groups = self.lock();
        let mut out: Vec<_> = groups
            .iter_mut()
            .filter_map(|(g, s)| {
                self.roll(s, now);
                self.view(s).map(|f| (g.clone(), f))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Sets the [`FORECAST_PER_MINUTE`](names::FORECAST_PER_MINUTE) and
    /// [`DEMAND_PER_MINUTE`](names::DEMAND_PER_MINUTE) gauges of every group.
    pub fn export(&self) {
        for (group, f) in self.forecasts() {
            let forecast = f.forecast.as_array();
            let demand = f.demand.as_array();
            for (i, bucket) in names::BUCKETS.iter().enumerate() {
                let labels = [
                    (names::LABEL_GROUP, group.as_str().to_owned()),
                    (names::LABEL_BUCKET, (*bucket).to_owned()),
                ];
                metrics::gauge!(names::FORECAST_PER_MINUTE, &labels).set(forecast[i]);
                metrics::gauge!(names::DEMAND_PER_MINUTE, &labels).set(demand[i]);
            }
        }
    }

    fn view(&self, series: &Series) -> Option<Forecast> {
        if series.intervals == 0 {
            return None;
        }
        let steps = self.inner.horizon.as_secs_f64() / self.inner.interval.as_secs_f64();
        let mut forecast = [0.0; 3];
        for (slot, model) in forecast.iter_mut().zip(&series.models) {
            *slot = model.forecast(steps).unwrap_or(0.0);
        }
        Some(Forecast {
            demand: Rates::from_array(series.last),
            forecast: Rates::from_array(forecast),
            intervals: series.intervals,
        })
    }

    /// Closes every interval that ended before `now`.
    fn roll(&self, series: &mut Series, now: Instant) {
        let interval = self.inner.interval;
        let per_minute = 60.0 / interval.as_secs_f64();
        let mut closed = 0u32;
        while now >= series.bin_start + interval {
            if closed >= MAX_CATCH_UP {
                // A long idle gap: start over from zero demand.
                series.models = [Holt::new(self.inner.alpha, self.inner.beta); 3];
                for model in &mut series.models {
                    model.update(0.0);
                }
                series.last = [0.0; 3];
                let gaps = now.duration_since(series.bin_start).as_nanos() / interval.as_nanos();
                let gaps = u32::try_from(gaps).unwrap_or(u32::MAX);
                series.bin_start += interval.saturating_mul(gaps);
                break;
            }
            let rates = series.bin.map(|v| v * per_minute);
            for (model, rate) in series.models.iter_mut().zip(rates) {
                model.update(rate);
            }
            series.last = rates;
            series.bin = [0.0; 3];
            series.bin_start += interval;
            series.intervals += 1;
            closed += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RateLimitGroup, Series>> {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holt_tracks_a_constant() {
        let mut h = Holt::new(0.5, 0.3);
        assert_eq!(h.forecast(1.0), None);
        for _ in 0..50 {
            h.update(100.0);
        }
        assert!((h.forecast(6.0).unwrap() - 100.0).abs() < 1e-6);
        assert!(h.trend().abs() < 1e-6);
    }

    #[test]
    fn holt_never_negative_and_ignores_nan() {
        let mut h = Holt::new(0.9, 0.9);
        for x in [100.0, 50.0, 0.0, f64::NAN, 0.0] {
            h.update(x);
        }
        assert!(h.level().unwrap().is_finite());
        assert_eq!(h.forecast(100.0), Some(0.0));
    }

    #[test]
    fn holt_beats_moving_average_on_a_ramp() {
        let mut h = Holt::new(0.5, 0.3);
        let series: Vec<f64> = (0..30).map(|i| f64::from(i) * 10.0).collect();
        for &x in &series {
            h.update(x);
        }
        let truth = 30.0 * 10.0 + 50.0; // five steps after the last observation (290)
        let ma: f64 = series[24..].iter().sum::<f64>() / 6.0;
        let holt = h.forecast(6.0).unwrap();
        assert!(
            (holt - truth).abs() < (ma - truth).abs() / 4.0,
            "{holt} vs {ma}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gap_resets_to_zero() {
        let f = Forecaster::with_config(Duration::from_secs(1), Duration::from_secs(5), 0.5, 0.5);
        let g = RateLimitGroup::new("g");
        for _ in 0..10 {
            f.record(&g, 10, 0, 0);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(f.forecast(&g).unwrap().demand.requests, 600.0);
        tokio::time::advance(Duration::from_secs(3600)).await;
        let after = f.forecast(&g).unwrap();
        assert_eq!(after.demand.requests, 0.0);
        assert!(after.forecast.requests < 1.0, "{after:?}");
    }

    proptest::proptest! {
        /// Any finite input keeps the model finite and the forecast non-negative.
        #[test]
        fn holt_stays_finite(xs in proptest::collection::vec(0.0f64..1e9, 1..300), steps in 0.0f64..100.0) {
            let mut h = Holt::new(0.5, 0.3);
            for x in xs {
                h.update(x);
            }
            let f = h.forecast(steps).unwrap();
            proptest::prop_assert!(f.is_finite() && f >= 0.0);
        }
    }
}
