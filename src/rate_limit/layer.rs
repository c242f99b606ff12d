//! [`RateLimitLayer`]: builder and `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::config::{Config, Scope};
use super::service::RateLimit;
use crate::anthropic::{ModelCatalog, RateLimitGroup};
use crate::quota::{Limits, OutputReservation, QuotaBoard};

/// Holds Messages API requests back until the `(key, group)` buckets of the
/// [`QuotaBoard`] hold their cost: 1 request, the estimated input tokens and an output
/// reservation (see [`OutputReservation`]). Builds [`RateLimit`].
///
/// * Key: [`KeyId::from_headers`](crate::anthropic::KeyId::from_headers), or
///   [`KeyId::anonymous`](crate::anthropic::KeyId::anonymous).
/// * Group: [`ModelCatalog::group`] of the request's `model`.
/// * Only `POST /v1/messages` with a readable body and a `model` is limited; everything else
///   passes through untouched.
///
/// Without [`board`](Self::board) the layer makes its own board; every service built from one
/// layer shares it.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::anthropic::RateLimitGroup;
/// use tower_claude::quota::{Limits, OutputReservation, QuotaBoard};
/// use tower_claude::rate_limit::RateLimitLayer;
///
/// let layer = RateLimitLayer::new()
///     .board(QuotaBoard::new())
///     .limits(RateLimitGroup::new("claude-opus-4"), Limits { rpm: 50, itpm: 30_000, otpm: 8_000 })
///     .default_limits(Limits { rpm: 50, itpm: 50_000, otpm: 10_000 })
///     .output_reservation(OutputReservation::Fraction(0.5))
///     .max_wait(Duration::from_secs(30));
/// # drop(layer);
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    board: QuotaBoard,
    /// Whether [`board`](Self::board) was called ([`ClaudeStack`](crate::stack::ClaudeStack)
    /// keeps a board given here).
    board_given: bool,
    catalog: ModelCatalog,
    output: OutputReservation,
    max_wait: Option<Duration>,
    limits: Vec<(RateLimitGroup, Limits)>,
    default_limits: Option<Limits>,
    cache_aware: bool,
    /// See [`key_checked_above`](Self::key_checked_above).
    key_checked_above: bool,
}

impl Default for RateLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitLayer {
    /// A layer with its own board, limits learned from response headers, the default model
    /// catalogue, `max_tokens` output reservations and no bound on the queue wait.
    pub fn new() -> Self {
        Self {
            board: QuotaBoard::new(),
            board_given: false,
            catalog: ModelCatalog::default(),
            output: OutputReservation::default(),
            max_wait: None,
            limits: Vec::new(),
            default_limits: None,
            cache_aware: true,
            key_checked_above: false,
        }
    }

    /// Uses (and writes to) `board`, shared with other layers. Limits already given to this
    /// builder are applied to it.
    pub fn board(mut self, board: QuotaBoard) -> Self {
        for (group, limits) in &self.limits {
            board.set_limits(group.clone(), *limits);
        }
        if let Some(limits) = self.default_limits {
            board.set_default_limits(limits);
        }
        self.board = board;
        self.board_given = true;
        self
    }

    /// Whether a board was given with [`board`](Self::board).
    pub(crate) fn board_given(&self) -> bool {
        self.board_given
    }

    /// Configured limits for `group` (applied to the board for every key).
    pub fn limits(mut self, group: RateLimitGroup, limits: Limits) -> Self {
        self.board.set_limits(group.clone(), limits);
        self.limits.push((group, limits));
        self
    }

    /// Configured limits for every group without limits of its own. Without any, limits are
    /// learned from the `anthropic-ratelimit-*` response headers.
    pub fn default_limits(mut self, limits: Limits) -> Self {
        self.board.set_default_limits(limits);
        self.default_limits = Some(limits);
        self
    }

    /// How many output tokens to reserve per request ([`OutputReservation::MaxTokens`] by
    /// default).
    pub fn output_reservation(mut self, policy: OutputReservation) -> Self {
        self.output = policy;
        self
    }

    /// The longest a request may wait for capacity; then it fails with an
    /// [`AcquireError`](crate::quota::AcquireError) of kind
    /// [`QueueTimeout`](crate::quota::AcquireErrorKind::QueueTimeout) carrying when capacity
    /// should return. `Duration::ZERO` fails at once instead of queueing.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// The model catalogue mapping model ids to rate-limit groups.
    pub fn catalog(mut self, catalog: ModelCatalog) -> Self {
        self.catalog = catalog;
        self
    }

    /// Whether a request reserves its cache-aware input estimate (`true`, the default): a
    /// prefix up to a `cache_control` breakpoint that the same key sent to the same model
    /// within its TTL is expected to be read from the prompt cache, and cache reads do not
    /// count toward the input-tokens-per-minute limit of current models
    /// ([`ModelCatalog::cache_reads_count`]). The board's
    /// [`PromptCacheMemory`](crate::quota::PromptCacheMemory) remembers the prefixes. With
    /// `false`, the whole prompt is reserved (settlement corrects either way).
    ///
    /// ```
    /// use tower_claude::rate_limit::RateLimitLayer;
    ///
    /// let layer = RateLimitLayer::new().cache_aware(false);
    /// # drop(layer);
    /// ```
    pub fn cache_aware(mut self, on: bool) -> Self {
        self.cache_aware = on;
        self
    }

    /// The request's key id is read from the memo a layer above left
    /// ([`KeyId::of_request_checked_above`](crate::anthropic::KeyId::of_request_checked_above)),
    /// not checked against the headers again: set by
    /// [`ClaudeStack`](crate::stack::ClaudeStack) under its metrics layer, which checks it,
    /// with only the stack's own layers between (a key pool remembers the key it puts on).
    pub(crate) fn key_checked_above(mut self) -> Self {
        self.key_checked_above = true;
        self
    }

    /// The board this layer writes to.
    pub fn quota_board(&self) -> &QuotaBoard {
        &self.board
    }
}

impl RateLimitLayer {
    /// The service, taking each request's cost from the buckets of `scope` (the tenant limit
    /// is this layer keyed by tenant).
    pub(crate) fn layer_scoped<S>(&self, inner: S, scope: Scope) -> RateLimit<S> {
        RateLimit::from_config(
            inner,
            Arc::new(Config {
                board: self.board.clone(),
                catalog: self.catalog.clone(),
                output: self.output,
                max_wait: self.max_wait,
                cache_aware: self.cache_aware,
                scope,
                key_checked_above: self.key_checked_above,
            }),
        )
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.layer_scoped(inner, Scope::Key)
    }
}
