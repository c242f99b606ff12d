//! [`MetricsLayer`]: builder and `tower::Layer` impl.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower_layer::Layer;

use super::alerts::Alerts;
use super::forecast::Forecaster;
use super::names;
use super::service::Metrics;
use crate::anthropic::{ModelCatalog, RateLimitGroup};
use crate::quota::QuotaBoard;

/// Records what the caller sees of every Messages API request on the
/// [`metrics`](https://docs.rs/metrics) facade: requests by model, status and outcome, tokens,
/// retries, fallbacks, cache decisions, queue wait, latency and in-flight requests; with a
/// [`board`](Self::board), quota gauges per key and group (and [`alerts`](Self::alerts) on
/// them); with a [`forecaster`](Self::forecaster), demand forecasts. Builds [`Metrics`].
///
/// Put it outermost. See the [module docs](super) for the metric names.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::metrics::{MetricsLayer, forecast::Forecaster};
/// use tower_claude::quota::QuotaBoard;
///
/// let layer = MetricsLayer::new()
///     .board(QuotaBoard::new())
///     .forecaster(Forecaster::new())
///     .known_models(["my-fine-tune"])
///     .quota_refresh(Duration::from_secs(1));
/// # drop(layer);
/// ```
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    shared: Arc<Shared>,
}

/// Configuration and state shared by every service of one layer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) catalog: ModelCatalog,
    pub(crate) known: HashSet<String>,
    pub(crate) board: Option<QuotaBoard>,
    pub(crate) alerts: Option<Alerts>,
    pub(crate) forecaster: Option<Forecaster>,
    pub(crate) refresh_every: Duration,
    pub(crate) last_refresh: Mutex<Option<Instant>>,
    pub(crate) json_limit: usize,
}

impl Default for MetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsLayer {
    /// A layer with the default catalogue and [`names::KNOWN_MODELS`], no board, no alerts and
    /// no forecaster.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                catalog: ModelCatalog::default(),
                known: names::KNOWN_MODELS
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect(),
                board: None,
                alerts: None,
                forecaster: None,
                refresh_every: Duration::from_secs(1),
                last_refresh: Mutex::new(None),
                json_limit: 8 << 20,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        f(shared);
        self
    }

    /// The model catalogue used to find a model's rate-limit group.
    pub fn catalog(self, catalog: ModelCatalog) -> Self {
        self.with(|s| s.catalog = catalog)
    }

    /// More model ids to report under their own name (others are reported as
    /// [`names::OTHER`]).
    pub fn known_models<I, T>(self, models: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.with(|s| s.known.extend(models.into_iter().map(Into::into)))
    }

    /// Exports the quota gauges of `board` (limit, remaining, utilisation per key, group and
    /// bucket), refreshed after responses (at most once per [`quota_refresh`](Self::quota_refresh))
    /// and by [`spawn_refresh`](Self::spawn_refresh).
    pub fn board(self, board: QuotaBoard) -> Self {
        self.with(|s| s.board = Some(board))
    }

    /// Whether a board was given with [`board`](Self::board).
    pub(crate) fn board_given(&self) -> bool {
        self.shared.board.is_some()
    }

    /// Feeds the board's utilisation to `alerts` on every quota refresh.
    pub fn alerts(self, alerts: Alerts) -> Self {
        self.with(|s| s.alerts = Some(alerts))
    }

    /// Records demand (requests and estimated input tokens on arrival, output tokens when the
    /// response ends) into `forecaster`, and exports its forecasts on every quota refresh.
    /// Give the same forecaster to a [`PacingLayer`](super::pacing::PacingLayer).
    pub fn forecaster(self, forecaster: Forecaster) -> Self {
        self.with(|s| s.forecaster = Some(forecaster))
    }

    /// The least time between two quota refreshes triggered by responses (1 s by default;
    /// `Duration::ZERO` refreshes after every response).
    pub fn quota_refresh(self, every: Duration) -> Self {
        self.with(|s| s.refresh_every = every)
    }

    /// The largest JSON response body copied to read its `usage` (8 MiB by default); larger
    /// bodies are still forwarded, their tokens are not counted.
    pub fn json_limit(self, bytes: usize) -> Self {
        self.with(|s| s.json_limit = bytes)
    }

    /// Refreshes the quota gauges, alerts and forecast gauges now.
    pub fn refresh(&self) {
        self.shared.refresh_now();
    }

    /// Spawns a task on the current tokio runtime that calls [`refresh`](Self::refresh) every
    /// `period` (at least 10 ms), so that gauges move while no response arrives. Abort the
    /// handle to stop it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn spawn_refresh(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        let period = period.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                shared.refresh_now();
            }
        })
    }
}

impl Clone for Shared {
    fn clone(&self) -> Self {
        Self {
            catalog: self.catalog.clone(),
            known: self.known.clone(),
            board: self.board.clone(),
            alerts: self.alerts.clone(),
            forecaster: self.forecaster.clone(),
            refresh_every: self.refresh_every,
            last_refresh: Mutex::new(None),
            json_limit: self.json_limit,
        }
    }
}

impl Shared {
    /// The `model` label: a known id, or [`names::OTHER`].
    pub(crate) fn model_label(&self, model: Option<&str>) -> String {
        match model {
            Some(m) if self.known.contains(m) => m.to_owned(),
            _ => names::OTHER.to_owned(),
        }
    }

    /// The rate-limit group of `model` and its label: a catalogue group, or `None` and
    /// [`names::OTHER`] for ids the catalogue places nowhere (so that arbitrary model ids
    /// create neither label values nor forecast state).
    pub(crate) fn group_of(&self, model: Option<&str>) -> (Option<RateLimitGroup>, String) {
        let Some(model) = model else {
            return (None, names::OTHER.to_owned());
        };
        let group = self.catalog.group(model);
        if self.known.contains(model) || group.as_str() != model {
            let label = group.as_str().to_owned();
            (Some(group), label)
        } else {
            (None, names::OTHER.to_owned())
        }
    }

    /// Refreshes after a response, at most once per `refresh_every`.
    pub(crate) fn maybe_refresh(&self) {
        if self.board.is_none() && self.forecaster.is_none() {
            return;
        }
        let now = Instant::now();
        {
            let mut last = self
                .last_refresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|t| now.duration_since(t) < self.refresh_every) {
                return;
            }
            *last = Some(now);
        }
        self.refresh_now();
    }

    pub(crate) fn refresh_now(&self) {
        if let Some(board) = &self.board {
            for status in board.statuses() {
                let headroom = &status.headroom;
                let buckets = [
                    (names::BUCKET_REQUESTS, headroom.requests),
                    (names::BUCKET_INPUT_TOKENS, headroom.input_tokens),
                    (names::BUCKET_OUTPUT_TOKENS, headroom.output_tokens),
                ];
                let mut worst: Option<(&'static str, f64)> = None;
                for (bucket, h) in buckets {
                    let Some(h) = h else { continue };
                    let utilisation = (1.0 - h.fraction).clamp(0.0, 1.0);
                    let labels = [
                        (names::LABEL_KEY, status.key.as_str().to_owned()),
                        (names::LABEL_GROUP, status.group.as_str().to_owned()),
                        (names::LABEL_BUCKET, bucket.to_owned()),
                    ];
                    metrics::gauge!(names::QUOTA_LIMIT, &labels).set(h.limit as f64);
                    metrics::gauge!(names::QUOTA_REMAINING, &labels).set(h.remaining as f64);
                    metrics::gauge!(names::QUOTA_UTILISATION, &labels).set(utilisation);
                    if worst.is_none_or(|(_, u)| utilisation > u) {
                        worst = Some((bucket, utilisation));
                    }
                }
                if let (Some(alerts), Some((bucket, utilisation))) = (&self.alerts, worst) {
                    alerts.observe(&status.key, &status.group, bucket, utilisation);
                }
            }
            // Prompt-cache tokens the rate limiter settled, per key and group (totals kept by
            // the board, exported as absolute counter values).
            for (key, group, usage) in board.prompt_cache().usages() {
                let labels = [
                    (names::LABEL_KEY, key.as_str().to_owned()),
                    (names::LABEL_GROUP, group.as_str().to_owned()),
                ];
                metrics::counter!(names::PROMPT_CACHE_READ_TOKENS_TOTAL, &labels)
                    .absolute(usage.read_tokens);
                metrics::counter!(names::PROMPT_CACHE_WRITE_TOKENS_TOTAL, &labels)
                    .absolute(usage.write_tokens);
                metrics::gauge!(names::PROMPT_CACHE_HIT_RATIO, &labels).set(usage.hit_ratio());
            }
        }
        if let Some(forecaster) = &self.forecaster {
            forecaster.export();
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metrics::from_shared(inner, self.shared.clone())
    }
}
