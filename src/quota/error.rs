//! The error returned when quota cannot be acquired.

use std::fmt;
use std::time::Duration;

use super::types::{Cost, Limits};
use crate::anthropic::{KeyId, RateLimitGroup};

/// Why a request could not be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcquireErrorKind {
    /// The request waited in the queue for the configured maximum time (or would have to wait
    /// longer than that); see [`AcquireError::available_in`].
    QueueTimeout,
    /// The request costs more than a bucket's whole capacity (e.g. more input tokens than the
    /// input-tokens-per-minute limit): it can never be admitted.
    RequestTooLarge,
    /// The shared quota store (Redis) is unreachable and the board is set to fail closed
    #[cfg_attr(
        feature = "redis",
        doc = "([`RedisOptions::fail_closed`](crate::quota::RedisOptions::fail_closed))."
    )]
    #[cfg_attr(
        not(feature = "redis"),
        doc = "(`RedisOptions::fail_closed`, feature `redis`)."
    )]
    BackendUnavailable,
}

/// A request could not be admitted by the [`QuotaBoard`](super::QuotaBoard).
///
/// Services of this crate return it boxed in a [`BoxError`](crate::BoxError); find it with
/// `err.downcast_ref::<AcquireError>()`.
///
/// ```
/// use tower_claude::quota::{AcquireErrorKind, Cost, Limits, QuotaBoard};
/// use tower_claude::anthropic::{KeyId, RateLimitGroup};
///
/// # tokio_test::block_on(async {
/// let board = QuotaBoard::new();
/// let group = RateLimitGroup::new("claude-haiku-4");
/// board.set_limits(group.clone(), Limits::new(10, 1_000, 1_000));
/// let err = board
///     .try_acquire(&KeyId::anonymous(), &group, Cost::new(1, 5_000, 0))
///     .unwrap_err();
/// assert_eq!(err.kind(), AcquireErrorKind::RequestTooLarge);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct AcquireError {
    kind: AcquireErrorKind,
    key: KeyId,
    group: RateLimitGroup,
    available_in: Option<Duration>,
    /// For a request too large: what it asked for and the limits it exceeds.
    sizes: Option<(Cost, Limits)>,
}

impl AcquireError {
    pub(crate) fn new(
        kind: AcquireErrorKind,
        key: KeyId,
        group: RateLimitGroup,
        available_in: Option<Duration>,
    ) -> Self {
        Self {
            kind,
            key,
            group,
            available_in,
            sizes: None,
        }
    }

    /// Attaches the cost asked for and the limits of the buckets (shown by `Display`).
    pub(crate) fn with_sizes(mut self, cost: Cost, limits: Limits) -> Self {
        self.sizes = Some((cost, limits));
        self
    }

    /// For a [`RequestTooLarge`](AcquireErrorKind::RequestTooLarge) refused by a rate
    /// limiter: the cost the request asked for (its cache-aware input estimate, see
    /// [`PromptCacheMemory`](super::PromptCacheMemory)) and the per-minute limits it exceeds.
    pub fn sizes(&self) -> Option<(Cost, Limits)> {
        self.sizes
    }

    /// The kind of error.
    pub fn kind(&self) -> AcquireErrorKind {
        self.kind
    }

    /// The key id the request was charged to.
    pub fn key(&self) -> &KeyId {
        &self.key
    }

    /// The rate-limit group of the request.
    pub fn group(&self) -> &RateLimitGroup {
        &self.group
    }

    /// For a [`QueueTimeout`](AcquireErrorKind::QueueTimeout): the time after which the
    /// buckets would hold the request's cost if nothing else were admitted and nothing
    /// refunded (an estimate, suitable for a `retry-after`). `None` for a request that can
    /// never fit.
    pub fn available_in(&self) -> Option<Duration> {
        self.available_in
    }
}

impl fmt::Display for AcquireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            AcquireErrorKind::QueueTimeout => {
                write!(
                    f,
                    "rate limit queue wait exceeded for key {} group {}",
                    self.key, self.group
                )?;
                if let Some(d) = self.available_in {
                    write!(f, "; capacity expected in {:.3}s", d.as_secs_f64())?;
                }
                Ok(())
            }
            AcquireErrorKind::RequestTooLarge => {
                write!(
                    f,
                    "request exceeds the per-minute capacity of key {} group {}",
                    self.key, self.group
                )?;
                if let Some((cost, limits)) = self.sizes {
                    write!(
                        f,
                        ": {} input tokens counted (limit {}), {} requests (limit {})",
                        cost.input_tokens, limits.itpm, cost.requests, limits.rpm
                    )?;
                }
                Ok(())
            }
            AcquireErrorKind::BackendUnavailable => write!(
                f,
                "the shared quota store is unreachable (fail closed) for key {} group {}",
                self.key, self.group
            ),
        }
    }
}

impl std::error::Error for AcquireError {}
