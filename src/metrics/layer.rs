//! [`MetricsLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::alerts::Alerts;
use super::forecast::Forecaster;
use super::names;
use super::service::Metrics;
use super::shared::Shared;
use crate::anthropic::ModelCatalog;
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
                known: names::KNOWN_MODELS.iter().map(|m| Arc::from(*m)).collect(),
                board: None,
                alerts: None,
                forecaster: None,
                refresh_every: Duration::from_secs(1),
                refresh: Default::default(),
                json_limit: crate::body::MAX_JSON_COPY,
                handles: Default::default(),
                labels: Default::default(),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        f(shared);
        // What the labels were derived from may have changed (the known models).
        shared.labels.clear();
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
        self.with(|s| {
            s.known
                .extend(models.into_iter().map(|m| Arc::from(m.into())))
        })
    }

    /// Exports the quota gauges of `board` (limit, remaining, utilisation per key, group and
    /// bucket), refreshed as requests end (at most once per [`quota_refresh`](Self::quota_refresh))
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

    /// The least time between two quota refreshes triggered by requests ending (1 s by
    /// default; `Duration::ZERO` refreshes as every request ends).
    pub fn quota_refresh(self, every: Duration) -> Self {
        self.with(|s| s.refresh_every = every)
    }

    /// The largest JSON response body copied to read its `usage` (8 MiB by default); larger
    /// bodies are still forwarded, their tokens are not counted. The answer's one copy is as
    /// large as the largest limit of the layers that read it (the rate limiter below copies
    /// up to 8 MiB whatever this says).
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

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metrics::from_shared(inner, self.shared.clone())
    }
}
