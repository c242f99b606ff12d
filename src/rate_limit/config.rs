//! The configuration a [`RateLimit`](super::RateLimit) service and its response futures share.

use std::time::Duration;

use crate::anthropic::ModelCatalog;
use crate::quota::{OutputReservation, QuotaBoard};

/// Whose buckets a request takes its cost from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The upstream API key's (the rate limiter).
    Key,
    /// The request's tenant's, with the limits of its own
    /// ([`TenantLimit`](crate::tenant::limit::TenantLimit)): requests of a tenant without
    /// limits for the group pass through, and the server's headers are not its view.
    Tenant,
}

/// The options of a rate limit layer, shared by its services and response futures.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) board: QuotaBoard,
    pub(crate) catalog: ModelCatalog,
    pub(crate) output: OutputReservation,
    pub(crate) max_wait: Option<Duration>,
    /// Reserve the cache-aware input estimate (see `RateLimitLayer::cache_aware`).
    pub(crate) cache_aware: bool,
    pub(crate) scope: Scope,
    /// The request's key was read, checked against its headers, by a layer above that only
    /// the stack's own layers follow (see `RateLimitLayer::key_checked_above`): the key id
    /// is taken from the memo it left.
    pub(crate) key_checked_above: bool,
}
