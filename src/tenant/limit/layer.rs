//! [`TenantLimitLayer`]: builder and `tower::Layer` impl.

use std::time::Duration;

use tower_layer::Layer;

use super::service::TenantLimit;
use crate::anthropic::ModelCatalog;
use crate::quota::{OutputReservation, QuotaBoard};
use crate::rate_limit::RateLimitLayer;
use crate::rate_limit::config::Scope;

/// Holds each tenant's Messages requests to the limits of its own
/// ([`Tenant::limit`](crate::tenant::Tenant::limit)); builds [`TenantLimit`]. See the
/// [module docs](super).
///
/// Without [`board`](Self::board) the layer makes its own board (one per layer, shared by the
/// services it builds). Give it a board of its own, not the upstream's: its keys are tenants.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::quota::{OutputReservation, QuotaBoard};
/// use tower_claude::tenant::limit::TenantLimitLayer;
///
/// let layer = TenantLimitLayer::new()
///     .board(QuotaBoard::new())
///     .output_reservation(OutputReservation::Fraction(0.5))
///     .max_wait(Duration::from_secs(30));
/// assert_eq!(layer.quota_board().len(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct TenantLimitLayer {
    /// The rate limiter's builder: the tenant limit is its service keyed by tenant.
    inner: RateLimitLayer,
}

impl Default for TenantLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TenantLimitLayer {
    /// A layer with its own board, the default model catalogue, `max_tokens` output
    /// reservations and no bound on the wait but the request's deadline.
    pub fn new() -> Self {
        Self {
            inner: RateLimitLayer::new(),
        }
    }

    /// Keeps the tenants' buckets in `board` (e.g. to read its
    /// [`statuses`](QuotaBoard::statuses), or a Redis board shared by several proxies).
    pub fn board(self, board: QuotaBoard) -> Self {
        Self {
            inner: self.inner.board(board),
        }
    }

    /// The model catalogue mapping model ids to rate-limit groups (the groups of
    /// [`Tenant::limit`](crate::tenant::Tenant::limit)).
    pub fn catalog(self, catalog: ModelCatalog) -> Self {
        Self {
            inner: self.inner.catalog(catalog),
        }
    }

    /// How many output tokens a request reserves against the tenant's output limit until its
    /// usage is known ([`OutputReservation::MaxTokens`] by default).
    pub fn output_reservation(self, policy: OutputReservation) -> Self {
        Self {
            inner: self.inner.output_reservation(policy),
        }
    }

    /// The longest a request may wait for its tenant's limits; then it fails with an
    /// [`AcquireError`](crate::quota::AcquireError) of kind
    /// [`QueueTimeout`](crate::quota::AcquireErrorKind::QueueTimeout). `Duration::ZERO`
    /// refuses at once instead of queueing.
    pub fn max_wait(self, max_wait: Duration) -> Self {
        Self {
            inner: self.inner.max_wait(max_wait),
        }
    }

    /// The board holding the tenants' buckets.
    pub fn quota_board(&self) -> &QuotaBoard {
        self.inner.quota_board()
    }
}

impl<S> Layer<S> for TenantLimitLayer {
    type Service = TenantLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TenantLimit::new(self.inner.layer_scoped(inner, Scope::Tenant))
    }
}
