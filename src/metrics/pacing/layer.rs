//! [`PacingLayer`]: builder and `tower::Layer` impl.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tower_layer::Layer;

use super::service::{Config, Pacing};
use crate::anthropic::{ModelCatalog, RateLimitGroup};
use crate::metrics::forecast::Forecaster;
use crate::quota::{Limits, QuotaBoard};

/// Spaces admissions of a group smoothly when its demand forecast nears the quota; see the
/// [module docs](super). Builds [`Pacing`].
///
/// Limits come from [`limits`](Self::limits), then [`default_limits`](Self::default_limits),
/// then the [`board`](Self::board) (configured or learned limits); a group without limits is
/// not paced.
///
/// ```
/// use tower_claude::anthropic::RateLimitGroup;
/// use tower_claude::metrics::forecast::Forecaster;
/// use tower_claude::metrics::pacing::PacingLayer;
/// use tower_claude::quota::{Limits, QuotaBoard};
///
/// let layer = PacingLayer::new(Forecaster::new())
///     .board(QuotaBoard::new())
///     .limits(RateLimitGroup::new("claude-opus-4"), Limits::new(50, 30_000, 8_000))
///     .trigger(0.8)
///     .release(0.6)
///     .target(0.9);
/// # drop(layer);
/// ```
#[derive(Debug, Clone)]
pub struct PacingLayer {
    config: Config,
}

impl PacingLayer {
    /// A layer reading `forecaster`: trigger 0.8, release 0.7, target 0.95, the default
    /// catalogue, no limits.
    pub fn new(forecaster: Forecaster) -> Self {
        Self {
            config: Config {
                forecaster,
                catalog: ModelCatalog::default(),
                limits: HashMap::new(),
                default_limits: None,
                board: None,
                trigger: 0.8,
                release: None,
                target: 0.95,
                ramp: None,
                groups: Arc::new(Mutex::new(HashMap::new())),
            },
        }
    }

    /// Limits of `group`.
    pub fn limits(mut self, group: RateLimitGroup, limits: Limits) -> Self {
        self.config.limits.insert(group, limits);
        self
    }

    /// Limits of every group without limits of its own.
    pub fn default_limits(mut self, limits: Limits) -> Self {
        self.config.default_limits = Some(limits);
        self
    }

    /// Reads limits the layer was not given from `board` (the rate limiter's board), and
    /// spreads what is left in its buckets over the forecast horizon: the paced rate is
    /// `target * limit + remaining / horizon`, so pacing never wastes a full bucket.
    pub fn board(mut self, board: QuotaBoard) -> Self {
        self.config.board = Some(board);
        self
    }

    /// Whether a board was given with [`board`](Self::board).
    pub(crate) fn board_given(&self) -> bool {
        self.config.board.is_some()
    }

    /// Share of a limit the forecast must reach to start pacing (0.8 by default).
    pub fn trigger(mut self, share: f64) -> Self {
        if share.is_finite() && share > 0.0 {
            self.config.trigger = share;
        }
        self
    }

    /// Share of a limit the forecast must fall below to stop pacing (`trigger - 0.1` by
    /// default; never above the trigger).
    pub fn release(mut self, share: f64) -> Self {
        if share.is_finite() {
            self.config.release = Some(share);
        }
        self
    }

    /// Share of a limit admissions are paced at (0.95 by default; clamped to `0.05..=1.0`).
    pub fn target(mut self, share: f64) -> Self {
        if share.is_finite() {
            self.config.target = share.clamp(0.05, 1.0);
        }
        self
    }

    /// Limits how fast a group's released request rate may rise (off by default): over any
    /// minute, at most `per_minute` more requests are released than over the minute before
    /// (from idle, `per_minute` in the first minute). This keeps the upstream clear of
    /// *acceleration limits*: the API may answer 429 to a sharp increase in usage even below
    /// the per-minute limits, and asks clients to ramp up gradually.
    ///
    /// With a ramp, pacing also starts when the forecast one horizon ahead exceeds what the
    /// ramp can follow (requests released over the last minute plus `per_minute`), not only
    /// at the `trigger` share of the quota, and stops only when neither holds. Every release
    /// counts, paced or not. Values below 1 count as 1.
    ///
    /// ```
    /// use tower_claude::metrics::forecast::Forecaster;
    /// use tower_claude::metrics::pacing::PacingLayer;
    ///
    /// // Never more than 8 requests per minute above the previous minute.
    /// let layer = PacingLayer::new(Forecaster::new()).ramp(8.0);
    /// # drop(layer);
    /// ```
    pub fn ramp(mut self, per_minute: f64) -> Self {
        if per_minute.is_finite() && per_minute > 0.0 {
            self.config.ramp = Some(per_minute.max(1.0));
        }
        self
    }

    /// The forecaster the layer reads (feed it with a
    /// [`MetricsLayer::forecaster`](crate::metrics::MetricsLayer::forecaster) above).
    ///
    /// ```
    /// use tower_claude::metrics::forecast::Forecaster;
    /// use tower_claude::metrics::pacing::PacingLayer;
    ///
    /// let layer = PacingLayer::new(Forecaster::new());
    /// let metrics = tower_claude::metrics::MetricsLayer::new().forecaster(layer.forecaster().clone());
    /// # drop(metrics);
    /// ```
    pub fn forecaster(&self) -> &Forecaster {
        &self.config.forecaster
    }

    /// The model catalogue mapping model ids to rate-limit groups.
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.config.catalog = catalog;
        self
    }
}

impl<S> Layer<S> for PacingLayer {
    type Service = Pacing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Pacing::from_config(inner, Arc::new(self.config.clone()))
    }
}
