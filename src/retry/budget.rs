//! A retry budget shared by every request of a layer (or of several layers).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

/// Caps retries to a share of the traffic, so that a failure storm cannot multiply the load on
/// an upstream that is already struggling.
///
/// Each new request deposits into the budget; each retry withdraws from it. With a
/// `retry_ratio` of `0.2`, five requests pay for one retry. `min_per_sec` retries per second
/// are always allowed so that a quiet client can still retry. Deposits expire after `ttl`.
/// This is [`tower::retry::budget::TpsBudget`] with its inputs clamped to valid ranges instead
/// of panicking (ttl to 1..=60 s, ratio to 0..=1000, a NaN ratio is 0).
///
/// Clones share the same budget: give one to several layers to cap them together.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::retry::{RetryBudget, RetryLayer};
///
/// // At most 20 % of requests retried, plus 1 retry per second.
/// let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
/// let layer = RetryLayer::new().budget(budget.clone());
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<TpsBudget>,
    ttl: Duration,
    min_per_sec: u32,
    retry_ratio: f32,
}

impl RetryBudget {
    /// A budget that lets `retry_ratio` retries per request deposited within `ttl`, plus
    /// `min_per_sec` retries per second.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let retry_ratio = if retry_ratio.is_nan() {
            0.0
        } else {
            retry_ratio.clamp(0.0, 1000.0)
        };
        let min_per_sec = min_per_sec.min(i32::MAX as u32 - 1);
        Self {
            inner: Arc::new(TpsBudget::new(ttl, min_per_sec, retry_ratio)),
            ttl,
            min_per_sec,
            retry_ratio,
        }
    }

    /// Records a new request (called once per request, not per attempt).
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Asks for one retry; `false` means the budget is empty and the retry must not happen.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

impl Default for RetryBudget {
    /// 20 % of requests within 10 s, plus 10 retries per second.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl)
            .field("min_per_sec", &self.min_per_sec)
            .field("retry_ratio", &self.retry_ratio)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_caps_retries() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.25);
        for _ in 0..8 {
            budget.deposit();
        }
        let granted = (0..10).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_the_budget() {
        let a = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        let b = a.clone();
        a.deposit();
        assert!(b.withdraw());
        assert!(!a.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_inputs_are_clamped_not_panicking() {
        let budget = RetryBudget::new(Duration::ZERO, u32::MAX, f32::NAN);
        budget.deposit();
        // ratio NaN -> 0: only the reserve (min_per_sec) allows retries.
        assert!(budget.withdraw());
        let budget = RetryBudget::new(Duration::from_secs(3600), 0, -1.0);
        budget.deposit();
        assert!(!budget.withdraw());
        assert!(format!("{budget:?}").contains("ttl: 60s"));
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 1.0);
        budget.deposit();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!budget.withdraw());
    }
}
