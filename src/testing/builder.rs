//! [`MockClaudeBuilder`] and [`MockLimits`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::anthropic::{KeyId, ModelCatalog, RateLimitGroup};

use super::MockClaude;

/// Per-minute limits of one rate-limit group, as the real API sets them per organisation tier.
///
/// Each limit is a continuously refilled token bucket whose capacity is the limit: a limit of
/// `L` per minute refills `L / 60` units a second and never holds more than `L`.
///
/// ```
/// use tower_claude::testing::MockLimits;
///
/// let tier1_sonnet = MockLimits { rpm: 50, itpm: 30_000, otpm: 8_000 };
/// assert_eq!(tier1_sonnet, MockLimits::new(50, 30_000, 8_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MockLimits {
    /// Requests per minute.
    pub rpm: u64,
    /// Input tokens per minute (the crate's estimate of each request's input is charged).
    pub itpm: u64,
    /// Output tokens per minute (`max_tokens` is reserved at admission, the unused part refunded
    /// when the answer ends).
    pub otpm: u64,
}

impl MockLimits {
    /// Limits of `rpm` requests, `itpm` input tokens and `otpm` output tokens per minute.
    pub const fn new(rpm: u64, itpm: u64, otpm: u64) -> Self {
        Self { rpm, itpm, otpm }
    }
}

impl Default for MockLimits {
    /// Generous limits (4 000 requests, 2 000 000 input and 400 000 output tokens per minute,
    /// the order of a high usage tier), so that a simulator without configured limits is not
    /// the bottleneck of a test.
    fn default() -> Self {
        Self::new(4_000, 2_000_000, 400_000)
    }
}

/// An opt-in model of Anthropic's *acceleration limits* (see
/// [`MockClaudeBuilder::acceleration_limit`]): the API may answer 429 to a sharp increase in
/// usage even below the per-minute limits, so an organisation that jumps from idle to full rate
/// is refused while one that ramps up gradually is not.
///
/// Per (API key, rate-limit group), admissions are counted over two consecutive sliding
/// windows of length `window`: the last one (`recent`) and the one before (`previous`). A
/// request is admitted only if `recent + 1 <= ceiling`, with, in requests per window,
///
/// ```text
/// rate    = max(floor_rpm, previous_rpm + growth_per_minute)
/// ceiling = max(1, rate · window / 60 s)
/// ```
///
/// where `previous_rpm` is the rate actually admitted over the previous window. So the admitted
/// rate may rise by at most `growth_per_minute` requests per minute every minute and starts
/// again from `floor_rpm` after a quiet spell. Once `rate` reaches the group's RPM limit the
/// ceiling no longer applies: the buckets alone decide (the model never limits more than the
/// per-minute limit would at full rate). Refused
/// requests take nothing and count for nothing; only admitted requests count as usage. Token
/// buckets are checked as usual on top of it.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::testing::AccelerationLimit;
///
/// let accel = AccelerationLimit::new(10, 5);
/// assert_eq!(accel.window, Duration::from_secs(60));
/// assert_eq!((accel.growth_per_minute, accel.floor_rpm), (10, 5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccelerationLimit {
    /// How much the admitted rate may rise, in requests per minute, per minute.
    pub growth_per_minute: u64,
    /// The admitted rate always allowed, in requests per minute, even after a quiet spell
    /// (at least one request per window is always allowed).
    pub floor_rpm: u64,
    /// The length of each of the two sliding windows usage is measured over (at least 1 s).
    pub window: Duration,
}

impl AccelerationLimit {
    /// Growth of `growth_per_minute` requests per minute per minute from a floor of
    /// `floor_rpm`, measured over windows of one minute.
    pub const fn new(growth_per_minute: u64, floor_rpm: u64) -> Self {
        Self {
            growth_per_minute,
            floor_rpm,
            window: Duration::from_secs(60),
        }
    }

    /// The same limit measured over windows of `window` (at least 1 s).
    pub const fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }
}

/// The largest request body the simulator accepts (the real API's limit): 32 MB.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Builds a [`MockClaude`]. Every option has a default that gives a well-behaved, instant
/// simulator: generous limits, no faults, no latency, 100 output tokens per answer, seed 0.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::testing::{MockClaude, MockLimits};
///
/// let mock = MockClaude::builder()
///     .limits("claude-opus-4-7", MockLimits { rpm: 50, itpm: 30_000, otpm: 8_000 })
///     .default_limits(MockLimits { rpm: 1_000, itpm: 400_000, otpm: 80_000 })
///     .seed(7)
///     .overloaded_rate(0.1)
///     .max_in_flight(Some(10))
///     .latency(Duration::from_millis(200), Duration::from_millis(5))
///     .output_tokens(100)
///     .build();
/// assert_eq!(mock.stats().received, 0);
/// ```
#[derive(Debug, Clone)]
pub struct MockClaudeBuilder {
    pub(crate) limits: Vec<(String, MockLimits)>,
    pub(crate) default_limits: MockLimits,
    pub(crate) catalog: Option<ModelCatalog>,
    pub(crate) api_keys: Option<HashSet<KeyId>>,
    pub(crate) seed: u64,
    pub(crate) overloaded_rate: f64,
    pub(crate) server_error_rate: f64,
    pub(crate) midstream_error_rate: f64,
    pub(crate) spend_cap: bool,
    pub(crate) max_in_flight: Option<u64>,
    pub(crate) base_latency: Duration,
    pub(crate) per_token_latency: Duration,
    pub(crate) output_tokens: u64,
    pub(crate) max_body_bytes: usize,
    pub(crate) acceleration: Option<AccelerationLimit>,
}

impl Default for MockClaudeBuilder {
    fn default() -> Self {
        Self {
            limits: Vec::new(),
            default_limits: MockLimits::default(),
            catalog: None,
            api_keys: None,
            seed: 0,
            overloaded_rate: 0.0,
            server_error_rate: 0.0,
            midstream_error_rate: 0.0,
            spend_cap: false,
            max_in_flight: None,
            base_latency: Duration::ZERO,
            per_token_latency: Duration::ZERO,
            output_tokens: 100,
            max_body_bytes: MAX_BODY_BYTES,
            acceleration: None,
        }
    }
}

impl MockClaudeBuilder {
    /// A builder with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits of the rate-limit group of `model_or_group`: either a model id (its group in the
    /// catalogue is used, so `"claude-opus-4-7"` sets the limits pooled by every Opus 4.x model)
    /// or a group name as [`ModelCatalog::group`] returns it. Later calls for the same group win.
    pub fn limits(mut self, model_or_group: impl Into<String>, limits: MockLimits) -> Self {
        self.limits.push((model_or_group.into(), limits));
        self
    }

    /// Limits of every group not named with [`limits`](Self::limits)
    /// (default: [`MockLimits::default`]).
    pub fn default_limits(mut self, limits: MockLimits) -> Self {
        self.default_limits = limits;
        self
    }

    /// The model catalogue that maps model ids to rate-limit groups
    /// (default: [`ModelCatalog::default`]).
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Accepts only these API keys (others get 401 `authentication_error`). By default any
    /// non-empty `x-api-key` (or `authorization: Bearer` key) is accepted. Only the keys' [`KeyId`]s are kept.
    pub fn api_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        self.api_keys = Some(
            keys.into_iter()
                .map(|k| KeyId::from_api_key(k.as_ref()))
                .collect(),
        );
        self
    }

    /// The seed of the fault-injection random generator (default 0). The same seed and the same
    /// sequence of requests give the same faults.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Probability (`0.0..=1.0`) that a valid Messages request gets 529 `overloaded_error`.
    pub fn overloaded_rate(mut self, rate: f64) -> Self {
        self.overloaded_rate = clamp_rate(rate);
        self
    }

    /// Probability (`0.0..=1.0`) that a valid Messages request gets 500 `api_error`.
    pub fn server_error_rate(mut self, rate: f64) -> Self {
        self.server_error_rate = clamp_rate(rate);
        self
    }

    /// Probability (`0.0..=1.0`) that an admitted streaming request fails after its first
    /// content delta with an SSE `event: error` (`overloaded_error`). A non-streaming request
    /// drawn for this fault gets a 529 instead.
    pub fn midstream_error_rate(mut self, rate: f64) -> Self {
        self.midstream_error_rate = clamp_rate(rate);
        self
    }

    /// Spend-cap mode: every valid Messages request gets 429 with
    /// `error.details.error_code = "enforced_spend_limit_reached"` and no `retry-after`.
    /// Can be switched at run time with [`MockClaude::set_spend_cap`].
    pub fn spend_cap(mut self, on: bool) -> Self {
        self.spend_cap = on;
        self
    }

    /// At most this many admitted requests in flight (from admission until the response body is
    /// fully sent or dropped); beyond it, 529 `overloaded_error`. `None` (default): no cap.
    pub fn max_in_flight(mut self, max: Option<u64>) -> Self {
        self.max_in_flight = max;
        self
    }

    /// Latency of an admitted request: `base + per_output_token * output_tokens` in total.
    /// A JSON answer arrives whole after the total; a stream sends `message_start` after `base`
    /// and each text delta when its tokens are generated. Default: zero.
    pub fn latency(mut self, base: Duration, per_output_token: Duration) -> Self {
        self.base_latency = base;
        self.per_token_latency = per_output_token;
        self
    }

    /// Output tokens generated per answer, capped by the request's `max_tokens` (then the
    /// `stop_reason` is `max_tokens`). Default 100.
    pub fn output_tokens(mut self, tokens: u64) -> Self {
        self.output_tokens = tokens;
        self
    }

    /// The largest accepted request body; larger ones get 413 `request_too_large`
    /// (default [`MAX_BODY_BYTES`], 32 MB, like the real API).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Enables the acceleration model ([`AccelerationLimit`]) for every (key, group): a sharp
    /// rise of the admitted request rate gets 429 `rate_limit_error` with a `retry-after` (whole
    /// seconds, rounded up: a retry after it is admitted if nothing else is admitted meanwhile)
    /// and the usual `anthropic-ratelimit-*` headers, which describe the per-minute buckets
    /// (they still hold quota: that is what makes these 429s hard to predict for a client).
    /// Such refusals are counted in [`MockStats::acceleration_limited`](super::MockStats) as
    /// well as `rate_limited`. Off by default.
    ///
    /// ```
    /// use tower_claude::testing::{AccelerationLimit, MockClaude};
    ///
    /// let mock = MockClaude::builder()
    ///     .acceleration_limit(AccelerationLimit::new(10, 5))
    ///     .build();
    /// # drop(mock);
    /// ```
    pub fn acceleration_limit(mut self, limit: AccelerationLimit) -> Self {
        self.acceleration = Some(limit);
        self
    }

    /// Builds the simulator. The wall clock used for `*-reset` headers is paired with tokio's
    /// clock now.
    pub fn build(self) -> MockClaude {
        MockClaude::from_builder(self)
    }

    pub(crate) fn resolved_limits(
        &self,
        catalog: &ModelCatalog,
    ) -> HashMap<RateLimitGroup, MockLimits> {
        let mut map = HashMap::new();
        for (name, limits) in &self.limits {
            // A group name is taken as is; a model id is placed by the catalogue. Inserting the
            // literal name as well makes both spellings work.
            map.insert(RateLimitGroup::new(name), *limits);
            map.insert(catalog.group(name), *limits);
        }
        map
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}
